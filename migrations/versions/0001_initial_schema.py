"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-30 01:31:54.519122
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('uri', sa.String(length=1024), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('architecture', sa.String(length=64), nullable=False),
    sa.Column('dtype', sa.String(length=16), nullable=False),
    sa.Column('config', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('total_bytes', sa.BigInteger(), nullable=False),
    sa.Column('num_parameters', sa.BigInteger(), nullable=False),
    sa.Column('tensors', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('file_sizes', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('file_sha256', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_reason', sa.String(length=512), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('uri', 'fingerprint', name=op.f('uq_models_uri'))
    )
    op.create_table('nodes',
    sa.Column('id', sa.String(length=63), nullable=False),
    sa.Column('address', sa.String(length=255), nullable=False),
    sa.Column('link_mbps', sa.Float(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('registered_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('info', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_nodes'))
    )
    op.create_table('prices',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('device_kind', sa.String(length=32), nullable=False),
    sa.Column('usd_per_gb_second', sa.Numeric(precision=16, scale=10), nullable=False),
    sa.Column('effective_from', sa.DateTime(timezone=True), nullable=False),
    sa.Column('effective_to', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_prices'))
    )
    op.create_index(op.f('ix_prices_device_kind'), 'prices', ['device_kind'], unique=False)
    op.create_table('tenants',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('max_concurrency', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants')),
    sa.UniqueConstraint('name', name=op.f('uq_tenants_name'))
    )
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=12), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_api_keys_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    op.create_index(op.f('ix_api_keys_tenant_id'), 'api_keys', ['tenant_id'], unique=False)
    op.create_table('devices',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.String(length=63), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('memory_bytes', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.id'], name=op.f('fk_devices_node_id_nodes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_devices')),
    sa.UniqueConstraint('node_id', 'index', name=op.f('uq_devices_node_id'))
    )
    op.create_table('functions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('alias_version', sa.Integer(), nullable=False),
    sa.Column('latest_version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_functions_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_functions'))
    )
    op.create_index(op.f('ix_functions_tenant_id'), 'functions', ['tenant_id'], unique=False)
    op.create_index('uq_functions_tenant_name_live', 'functions', ['tenant_id', 'name'], unique=True, postgresql_where=sa.text('deleted_at IS NULL'))
    op.create_table('function_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('function_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('ttft_ms', sa.Integer(), nullable=False),
    sa.Column('tpot_ms', sa.Integer(), nullable=False),
    sa.Column('keep_alive_s', sa.Integer(), nullable=False),
    sa.Column('min_instances', sa.Integer(), nullable=False),
    sa.Column('max_instances', sa.Integer(), nullable=False),
    sa.Column('description', sa.String(length=512), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['function_id'], ['functions.id'], name=op.f('fk_function_versions_function_id_functions'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_function_versions_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_function_versions')),
    sa.UniqueConstraint('function_id', 'version', name=op.f('uq_function_versions_function_id'))
    )
    op.create_index(op.f('ix_function_versions_model_id'), 'function_versions', ['model_id'], unique=False)
    op.create_table('invocations',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('function_id', sa.Integer(), nullable=False),
    sa.Column('function_version_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('request', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('output', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('error', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('cold', sa.Boolean(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('tokens_in', sa.Integer(), nullable=True),
    sa.Column('tokens_out', sa.Integer(), nullable=True),
    sa.Column('instance_ids', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('queued_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('planned_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('fetched_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('loaded_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('first_token_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['function_id'], ['functions.id'], name=op.f('fk_invocations_function_id_functions')),
    sa.ForeignKeyConstraint(['function_version_id'], ['function_versions.id'], name=op.f('fk_invocations_function_version_id_function_versions')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_invocations_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_invocations'))
    )
    op.create_index(op.f('ix_invocations_function_id'), 'invocations', ['function_id'], unique=False)
    op.create_index(op.f('ix_invocations_status'), 'invocations', ['status'], unique=False)
    op.create_index(op.f('ix_invocations_tenant_id'), 'invocations', ['tenant_id'], unique=False)
    op.create_table('plans',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('function_version_id', sa.Integer(), nullable=False),
    sa.Column('pp', sa.Integer(), nullable=False),
    sa.Column('stages', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('predicted_ttft_ms', sa.Float(), nullable=True),
    sa.Column('predicted_tpot_ms', sa.Float(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=512), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['function_version_id'], ['function_versions.id'], name=op.f('fk_plans_function_version_id_function_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_plans'))
    )
    op.create_index(op.f('ix_plans_function_version_id'), 'plans', ['function_version_id'], unique=False)
    op.create_table('instances',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('function_version_id', sa.Integer(), nullable=False),
    sa.Column('plan_id', sa.Integer(), nullable=True),
    sa.Column('node_id', sa.String(length=63), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=True),
    sa.Column('stage_index', sa.Integer(), nullable=False),
    sa.Column('num_stages', sa.Integer(), nullable=False),
    sa.Column('memory_bytes', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('timeline', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ready_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('released_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], name=op.f('fk_instances_device_id_devices')),
    sa.ForeignKeyConstraint(['function_version_id'], ['function_versions.id'], name=op.f('fk_instances_function_version_id_function_versions')),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.id'], name=op.f('fk_instances_node_id_nodes')),
    sa.ForeignKeyConstraint(['plan_id'], ['plans.id'], name=op.f('fk_instances_plan_id_plans')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instances'))
    )
    op.create_index(op.f('ix_instances_function_version_id'), 'instances', ['function_version_id'], unique=False)
    op.create_table('usage_records',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('instance_id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('function_id', sa.Integer(), nullable=False),
    sa.Column('device_kind', sa.String(length=32), nullable=False),
    sa.Column('memory_gb', sa.Numeric(precision=12, scale=4), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['function_id'], ['functions.id'], name=op.f('fk_usage_records_function_id_functions')),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], name=op.f('fk_usage_records_instance_id_instances')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_usage_records_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_records'))
    )
    op.create_index(op.f('ix_usage_records_function_id'), 'usage_records', ['function_id'], unique=False)
    op.create_index(op.f('ix_usage_records_instance_id'), 'usage_records', ['instance_id'], unique=False)
    op.create_index(op.f('ix_usage_records_tenant_id'), 'usage_records', ['tenant_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_usage_records_tenant_id'), table_name='usage_records')
    op.drop_index(op.f('ix_usage_records_instance_id'), table_name='usage_records')
    op.drop_index(op.f('ix_usage_records_function_id'), table_name='usage_records')
    op.drop_table('usage_records')
    op.drop_index(op.f('ix_instances_function_version_id'), table_name='instances')
    op.drop_table('instances')
    op.drop_index(op.f('ix_plans_function_version_id'), table_name='plans')
    op.drop_table('plans')
    op.drop_index(op.f('ix_invocations_tenant_id'), table_name='invocations')
    op.drop_index(op.f('ix_invocations_status'), table_name='invocations')
    op.drop_index(op.f('ix_invocations_function_id'), table_name='invocations')
    op.drop_table('invocations')
    op.drop_index(op.f('ix_function_versions_model_id'), table_name='function_versions')
    op.drop_table('function_versions')
    op.drop_index('uq_functions_tenant_name_live', table_name='functions', postgresql_where=sa.text('deleted_at IS NULL'))
    op.drop_index(op.f('ix_functions_tenant_id'), table_name='functions')
    op.drop_table('functions')
    op.drop_table('devices')
    op.drop_index(op.f('ix_api_keys_tenant_id'), table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_table('tenants')
    op.drop_index(op.f('ix_prices_device_kind'), table_name='prices')
    op.drop_table('prices')
    op.drop_table('nodes')
    op.drop_table('models')
