"""invocations.worker_deaths: deaths of a worker while it was prefilling the request

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 06:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('invocations', sa.Column('worker_deaths', sa.Integer(), nullable=False,
                                           server_default='0'))


def downgrade() -> None:
    op.drop_column('invocations', 'worker_deaths')
