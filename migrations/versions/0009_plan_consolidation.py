"""plans.consolidation_*: what the scheduler decided about turning a pipeline back into a
standalone replica, and when it happened (docs/consolidation.md)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 17:00:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('plans', sa.Column('consolidation_state', sa.String(16)))
    op.add_column('plans', sa.Column('consolidation_target', sa.Integer()))
    op.add_column('plans', sa.Column('consolidation_reason', sa.String(512)))
    op.add_column('plans', sa.Column('consolidation_started_at', sa.DateTime(timezone=True)))
    op.add_column('plans', sa.Column('consolidated_at', sa.DateTime(timezone=True)))
    op.add_column('plans', sa.Column('consolidation', postgresql.JSONB(), nullable=False,
                                     server_default='{}'))


def downgrade() -> None:
    for name in ('consolidation', 'consolidated_at', 'consolidation_started_at',
                 'consolidation_reason', 'consolidation_target', 'consolidation_state'):
        op.drop_column('plans', name)
