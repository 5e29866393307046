"""The price table: per device kind, a chain of prices that follow each other without gaps or
overlaps, each over ``[effective_from, effective_to)``, the latest open-ended.

A price's past is never changed: a price that has started cannot be deleted, and a new price
may close the open one only from now on. A new price may start in the past only where nothing
was priced (the first of its kind, or right where an ended price ended): it then prices memory
time the reports so far showed as unpriced, and changes no charge already made.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Literal

from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session

from hydraserve.billing.cost import PriceSpan, decimal_text
from hydraserve.billing.models import Price
from hydraserve.billing.times import EARLIEST, LATEST, iso_utc
from hydraserve.db import utcnow
from hydraserve.errors import Conflict, InvalidRequest, NotFound

KIND_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,31}$"  # as usage records name it: "cpu", "cuda"
KIND_RE = re.compile(KIND_PATTERN)
# what Numeric(16, 10) holds: up to 6 digits before the point and 10 after
USD_PATTERN = r"^(0|[1-9][0-9]{0,5})(\.[0-9]{1,10})?$"
USD_RE = re.compile(USD_PATTERN)
USD_QUANTUM = Decimal(1).scaleb(-10)
USD_RULE = ("a decimal string of at most 6 digits before the point and 10 after, not negative, "
            "e.g. \"0.0000012\"")
MAX_ID = 2**31 - 1
PriceStatus = Literal["scheduled", "in_force", "past"]
LOCK_SPACE = 0x505243  # "PRC": advisory-lock keys are (LOCK_SPACE, hashtext(device kind))
LOCK = text("SELECT pg_advisory_xact_lock(:space, hashtext(:kind))")


def check_kind(value: str, param: str = "device_kind") -> str:
    if not KIND_RE.match(value):
        raise InvalidRequest(f"device_kind {value[:60]!r} is not a device kind; use 1-32 "
                             "lower-case letters, digits, '.', '_' or '-' (\"cpu\", \"cuda\")",
                             param)
    return value


def parse_usd(value: str, param: str = "usd_per_gb_second") -> Decimal:
    """A price given as a decimal string; never a float."""
    if not USD_RE.match(value):
        raise InvalidRequest(f"{param} {value[:60]!r} is not a price; use {USD_RULE}", param)
    try:
        return Decimal(value)
    except InvalidOperation:  # the pattern lets only decimals through; kept for the message
        raise InvalidRequest(f"{param} {value[:60]!r} is not a decimal", param) from None


def describe(p: Price) -> str:
    """A price as error messages name it."""
    until = iso_utc(p.effective_to) if p.effective_to else "open-ended"
    return (f"price {p.id} ({p.device_kind}, {decimal_text(p.usd_per_gb_second)} USD per "
            f"GB-second, from {iso_utc(p.effective_from)}, until {until})")


def list_prices(session: Session, device_kind: str | None = None) -> list[Price]:
    """Every price (of one kind), by kind and start."""
    q = select(Price).order_by(Price.device_kind, Price.effective_from)
    if device_kind is not None:
        q = q.where(Price.device_kind == check_kind(device_kind))
    return list(session.scalars(q))


def _lock_kind(session: Session, device_kind: str) -> None:
    # prices of one kind change one at a time: the checks below read the chain's end, and a
    # concurrent add must not see it before this one's commit
    session.execute(LOCK, {"space": LOCK_SPACE, "kind": device_kind})


def _latest(session: Session, device_kind: str) -> Price | None:
    return session.scalar(select(Price).where(Price.device_kind == device_kind)
                          .order_by(Price.effective_from.desc()).limit(1)
                          .execution_options(populate_existing=True))


def add_price(session: Session, device_kind: str, usd_per_gb_second: Decimal,
              effective_from: datetime, effective_to: datetime | None = None,
              now: datetime | None = None) -> Price:
    """Adds a price after the latest of its kind, closing that one at ``effective_from`` if it
    is open; commits. A gap or an overlap with the latest is a 409 naming it. ``now`` is for
    tests; the API and the CLI use the clock."""
    check_kind(device_kind)
    parse_usd(decimal_text(usd_per_gb_second))  # what the column holds, unrounded
    usd = usd_per_gb_second.quantize(USD_QUANTUM)  # exact (at most 10 places): as stored
    for param, t in (("effective_from", effective_from), ("effective_to", effective_to)):
        if t is not None and not (t.tzinfo is not None and EARLIEST <= t < LATEST):
            raise InvalidRequest(f"{param} {t.isoformat()} is not a UTC time within "
                                 f"{iso_utc(EARLIEST)} .. {iso_utc(LATEST)}", param)
    if effective_to is not None and effective_to <= effective_from:
        raise InvalidRequest(f"effective_to {iso_utc(effective_to)} is not after "
                             f"effective_from {iso_utc(effective_from)}", "effective_to")
    now = now or utcnow()
    _lock_kind(session, device_kind)
    latest = _latest(session, device_kind)
    if latest is not None:
        _check_follows(latest, effective_from, now)
        if latest.effective_to is None:
            latest.effective_to = effective_from
            session.flush()  # before the insert: one open price per kind, at every moment
    row = Price(device_kind=device_kind, usd_per_gb_second=usd,
                effective_from=effective_from, effective_to=effective_to)
    session.add(row)
    session.commit()
    return row


def _check_follows(latest: Price, start: datetime, now: datetime) -> None:
    """A new price starting at ``start`` must follow ``latest`` exactly: after its start if it
    is open (closing it then, which must not be in the past), at its end if it has ended."""
    what = f"effective_from {iso_utc(start)}"
    if latest.effective_to is None:
        if start <= latest.effective_from:
            raise Conflict(f"{what} overlaps {describe(latest)}; a new price must start after "
                           "the latest price of its kind", "effective_from")
        if start < now:
            raise Conflict(f"{what} is in the past: it would close {describe(latest)} at a time "
                           "already billed, and past prices are immutable; start the new price "
                           "now or later", "effective_from")
    elif start < latest.effective_to:
        raise Conflict(f"{what} overlaps {describe(latest)}; start the new price at its end",
                       "effective_from")
    elif start > latest.effective_to:
        raise Conflict(f"{what} leaves a gap after {describe(latest)}; start the new price at "
                       "its end", "effective_from")


def delete_price(session: Session, price_id: int, now: datetime | None = None) -> Price:
    """Deletes a price that has not started yet and is the latest of its kind; the price
    before it gets its end again. Commits; returns the deleted row."""
    missing = NotFound(f"price {price_id} not found", "price_id")
    if not 0 < price_id <= MAX_ID:
        raise missing
    kind = session.scalar(select(Price.device_kind).where(Price.id == price_id))
    if kind is None:
        raise missing
    _lock_kind(session, kind)
    row = session.scalar(select(Price).where(Price.id == price_id)  # as the lock's last
                         .execution_options(populate_existing=True))  # holder left it
    if row is None:
        raise missing
    now = now or utcnow()
    latest = _latest(session, row.device_kind)
    if row.effective_from <= now:
        raise Conflict(f"{describe(row)} has started and past prices are immutable; add a new "
                       "price to change it from a later date", "price_id")
    if latest is not None and latest.id != row.id:
        raise Conflict(f"{describe(latest)} follows {describe(row)}; delete that one first",
                       "price_id")
    before = session.scalar(select(Price).where(Price.device_kind == row.device_kind,
                                                Price.effective_to == row.effective_from))
    end = row.effective_to
    session.delete(row)
    session.flush()  # before reopening the previous one: one open price per kind
    if before is not None:
        before.effective_to = end
    session.commit()
    return row


def price_spans(session: Session, kinds: Iterable[str], start: datetime,
                end: datetime) -> dict[str, list[PriceSpan]]:
    """The prices of ``kinds`` in force at some time of ``[start, end)``, by kind."""
    kinds = sorted(set(kinds))
    out: dict[str, list[PriceSpan]] = {k: [] for k in kinds}
    if not kinds:
        return out
    rows = session.scalars(select(Price).where(
        Price.device_kind.in_(kinds), Price.effective_from < end,
        or_(Price.effective_to.is_(None), Price.effective_to > start)))
    for p in rows:
        out[p.device_kind].append(PriceSpan(p.effective_from, p.effective_to,
                                            p.usd_per_gb_second))
    return out


def status(p: Price, now: datetime) -> PriceStatus:
    """``scheduled``, ``in_force`` or ``past`` at ``now``."""
    if p.effective_from > now:
        return "scheduled"
    return "past" if p.effective_to is not None and p.effective_to <= now else "in_force"
