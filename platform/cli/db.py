"""``hydraserve db``: create the database and run migrations."""

from __future__ import annotations

from pathlib import Path

import click
import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from hydraserve.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def alembic_config(database_url: str):
    from alembic.config import Config

    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(database_url), revision)


def database_name(database_url: str) -> str:
    name = make_url(database_url).database
    if not name:
        raise click.ClickException(f"database URL {database_url!r} names no database; end it "
                                   "with /<name>")
    return name


def create_database(database_url: str) -> bool:
    """Creates the database named in ``database_url`` if absent; True when it was created."""
    url, name = make_url(database_url), database_name(database_url)
    admin = url.set(drivername="postgresql", database="postgres")
    conninfo = admin.render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (name,)).fetchone()
        if exists:
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True


def drop_database(database_url: str) -> None:
    url = make_url(database_url)
    admin = url.set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(database_name(database_url))))


@click.group()
def db() -> None:
    """Database commands."""


@db.command("create")
def db_create() -> None:
    """Create the database of HYDRA_DATABASE_URL if it does not exist."""
    url = Settings.from_env().database_url
    click.echo(("created " if create_database(url) else "exists: ") + database_name(url))


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (creating the database first if needed)."""
    url = Settings.from_env().database_url
    create_database(url)
    upgrade(url, revision)
    click.echo(f"database {make_url(url).database} at {revision}")
