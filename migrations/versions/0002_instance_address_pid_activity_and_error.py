"""instance address, pid, activity and error

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 01:43:33.733232
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('instances', sa.Column('address', sa.String(length=255), nullable=False, server_default=''))
    op.add_column('instances', sa.Column('pid', sa.Integer(), nullable=True))
    op.add_column('instances', sa.Column('error', sa.String(length=1024), nullable=True))
    op.add_column('instances', sa.Column('last_active_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index(op.f('ix_instances_status'), 'instances', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_instances_status'), table_name='instances')
    op.drop_column('instances', 'last_active_at')
    op.drop_column('instances', 'error')
    op.drop_column('instances', 'pid')
    op.drop_column('instances', 'address')
