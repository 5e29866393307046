"""prices: one price per kind and start, one open price per kind, ranges that end after they start

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 09:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_unique_constraint('uq_prices_device_kind_effective_from', 'prices',
                                ['device_kind', 'effective_from'])
    # at most one open-ended price per kind: the latest (billing/prices.py closes the previous
    # one when it adds a price)
    op.create_index('uq_prices_device_kind_open', 'prices', ['device_kind'], unique=True,
                    postgresql_where=sa.text('effective_to IS NULL'))
    op.create_check_constraint(op.f('ck_prices_effective_range'), 'prices',
                               'effective_to IS NULL OR effective_to > effective_from')
    op.create_check_constraint(op.f('ck_prices_usd_per_gb_second_not_negative'), 'prices',
                               'usd_per_gb_second >= 0')


def downgrade() -> None:
    op.drop_constraint(op.f('ck_prices_usd_per_gb_second_not_negative'), 'prices', type_='check')
    op.drop_constraint(op.f('ck_prices_effective_range'), 'prices', type_='check')
    op.drop_index('uq_prices_device_kind_open', table_name='prices',
                  postgresql_where=sa.text('effective_to IS NULL'))
    op.drop_constraint('uq_prices_device_kind_effective_from', 'prices', type_='unique')
