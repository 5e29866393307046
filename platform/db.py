"""Postgres plumbing every domain shares: the declarative base, engine and session factory,
and the NOTIFY channel that wakes the scheduler."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import DateTime, MetaData, create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

T = TypeVar("T")
EVENTS_CHANNEL = "hydra_events"  # Postgres NOTIFY channel the scheduler listens on

# Stable constraint names, so Alembic migrations can refer to them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True)}


def utcnow() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str) -> Engine:
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def make_session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(bind=engine, expire_on_commit=False)


def notify(session: Session, what: str) -> None:
    """Tells the scheduler that ``what`` happened (delivered when the transaction commits)."""
    session.execute(text("SELECT pg_notify(:c, :p)"), {"c": EVENTS_CHANNEL, "p": what})


def must_get(session: Session, model: type[T], key: object) -> T:
    """The ``model`` row with primary key ``key``, for ids the database handed out (an instance's
    plan, a version's model); that it is gone is a bug, reported with both."""
    row = session.get(model, key)
    assert row is not None, f"{model.__name__} {key!r} does not exist"
    return row
