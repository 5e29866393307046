"""Alembic: one head, a full round trip, and the models agree with the migrations."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from hydraserve.cli.db import alembic_config, downgrade, drop_database, upgrade
from hydraserve.models import Base
from tests.conftest import fresh_database_url


@pytest.fixture
def scratch_db():
    url = fresh_database_url("mig")
    yield url
    drop_database(url)


def test_exactly_one_head(database_url):
    heads = ScriptDirectory.from_config(alembic_config(database_url)).get_heads()
    assert len(heads) == 1, f"several Alembic heads: {heads}; merge them"


def test_upgrade_downgrade_upgrade(scratch_db):
    upgrade(scratch_db)
    engine = create_engine(scratch_db)
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    downgrade(scratch_db, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    upgrade(scratch_db)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_models_match_migrations(engine):
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models and migrations differ; add a revision: {diff}"
