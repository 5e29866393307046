"""Postgres plumbing every domain shares: the declarative base, engine and session factory,
and the NOTIFY channel that wakes the scheduler."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import DateTime, MetaData, create_engine, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

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
    # hide_parameters: a database error's text (logged, raised) never carries the statement's
    # parameters, which hold prompts, outputs and key hashes
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10,
                         hide_parameters=True)


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


# Postgres jsonb cannot hold U+0000, which a model may generate (a byte-fallback token decodes
# to it). A string that holds one, or that starts with ESCAPE, is stored as ESCAPE + the string
# with ESCAPE doubled and NUL written as ESCAPE "0"; nothing else changes. ESCAPE is a private
# use character, so ordinary text is stored as it is.
ESCAPE = "\ue000"


def escape_nul(value: Any) -> Any:
    """``value`` (JSON-shaped) with every string made storable in jsonb, reversibly."""
    if isinstance(value, str):
        if "\x00" not in value and not value.startswith(ESCAPE):
            return value
        return ESCAPE + value.replace(ESCAPE, ESCAPE * 2).replace("\x00", ESCAPE + "0")
    if isinstance(value, dict):
        return {k: escape_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [escape_nul(v) for v in value]
    return value


def unescape_nul(value: Any) -> Any:
    """The inverse of ``escape_nul``."""
    if isinstance(value, str):
        if not value.startswith(ESCAPE):
            return value
        out, chars = [], iter(value[1:])
        for ch in chars:
            if ch == ESCAPE:
                nxt = next(chars, "")
                out.append("\x00" if nxt == "0" else nxt)
            else:
                out.append(ch)
        return "".join(out)
    if isinstance(value, dict):
        return {k: unescape_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unescape_nul(v) for v in value]
    return value


class NulSafeJSONB(TypeDecorator):
    """jsonb that stores any string losslessly, NUL included (see ``escape_nul``): for what a
    model generates (invocation outputs) and errors that may quote it."""

    impl = JSONB
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return escape_nul(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return unescape_nul(value)
