"""tenant limits, per-version max_concurrency, per-minute tenant usage

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 18:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('tenants', sa.Column('max_queued', sa.Integer(), nullable=False, server_default='1024'))
    op.add_column('tenants', sa.Column('requests_per_minute', sa.Integer(), nullable=False, server_default='6000'))
    op.add_column('tenants', sa.Column('tokens_per_minute', sa.Integer(), nullable=False, server_default='2000000'))
    op.add_column('function_versions', sa.Column('max_concurrency', sa.Integer(), nullable=True))
    op.create_table(
        'tenant_usage',
        sa.Column('tenant_id', sa.Integer(), nullable=False),
        sa.Column('minute', sa.DateTime(timezone=True), nullable=False),
        sa.Column('requests', sa.Integer(), nullable=False),
        sa.Column('tokens', sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_tenant_usage_tenant_id_tenants'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('tenant_id', 'minute', name=op.f('pk_tenant_usage')),
    )
    # the in-flight counts of admission read only unfinished rows of one tenant
    op.create_index('ix_invocations_tenant_unfinished', 'invocations', ['tenant_id', 'status'],
                    postgresql_where=sa.text("status IN ('queued', 'running')"))


def downgrade() -> None:
    op.drop_index('ix_invocations_tenant_unfinished', table_name='invocations')
    op.drop_table('tenant_usage')
    op.drop_column('function_versions', 'max_concurrency')
    op.drop_column('tenants', 'tokens_per_minute')
    op.drop_column('tenants', 'requests_per_minute')
    op.drop_column('tenants', 'max_queued')
