"""model_profiles and planner_measurements: the planner's inputs, measured from served
requests and cold-start timelines (scheduler/profiles.py)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 13:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'model_profiles',
        sa.Column('model_id', sa.Integer(), nullable=False),
        sa.Column('device_kind', sa.String(32), nullable=False),
        sa.Column('tpot_s', sa.Float(), nullable=True),
        sa.Column('prefill_s', sa.Float(), nullable=True),
        sa.Column('prefill_s_per_token', sa.Float(), nullable=True),
        sa.Column('samples', sa.Integer(), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['model_id'], ['models.id'],
                                name=op.f('fk_model_profiles_model_id_models'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('model_id', 'device_kind', name=op.f('pk_model_profiles')))
    op.create_table(
        'planner_measurements',
        sa.Column('name', sa.String(32), nullable=False),
        sa.Column('value', sa.Float(), nullable=False),
        sa.Column('samples', sa.Integer(), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_planner_measurements')))


def downgrade() -> None:
    op.drop_table('planner_measurements')
    op.drop_table('model_profiles')
