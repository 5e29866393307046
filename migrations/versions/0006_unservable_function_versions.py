"""function_versions.unservable_reason/_at and starts_cleared_at: a version whose cold starts
keep failing is marked unservable (with the last failure's cause) until a new version or an
admin clears it

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 13:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('function_versions', sa.Column('unservable_reason', sa.String(1024)))
    op.add_column('function_versions', sa.Column('unservable_at', sa.DateTime(timezone=True)))
    op.add_column('function_versions', sa.Column('starts_cleared_at',
                                                 sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column('function_versions', 'starts_cleared_at')
    op.drop_column('function_versions', 'unservable_at')
    op.drop_column('function_versions', 'unservable_reason')
