"""plans.policy: the scheduler policy a plan was made under (hydra, pp1, sequential)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 13:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('plans', sa.Column('policy', sa.String(16), nullable=False,
                                     server_default='hydra'))


def downgrade() -> None:
    op.drop_column('plans', 'policy')
