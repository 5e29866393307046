"""UTC timestamps as billing takes and writes them: ISO 8601 with an offset (or a date, meaning
its UTC midnight) in, ``...Z`` out, within years billing can cut into days."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)  # exclusive; a day after it still fits a datetime
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
RULE = "an ISO 8601 UTC time such as 2026-01-31T00:00:00Z, or a date such as 2026-01-31"


def parse_utc(value: str) -> datetime:
    """``value`` as an aware UTC datetime; ValueError with the rule otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string: {RULE}")
    try:
        if DATE_RE.match(value):
            t = datetime.combine(date.fromisoformat(value), time(0), tzinfo=UTC)
        else:
            t = datetime.fromisoformat(value)
            if t.tzinfo is None:
                raise ValueError(f"{value[:60]!r} has no UTC offset; end it with Z: {RULE}")
            t = t.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value[:60]!r} is out of range: {RULE}") from None
    except ValueError as exc:
        if "UTC offset" in str(exc):
            raise
        raise ValueError(f"{value[:60]!r} is not {RULE}") from None
    if not EARLIEST <= t < LATEST:
        raise ValueError(f"{value[:60]!r} is outside {iso_utc(EARLIEST)} .. {iso_utc(LATEST)}")
    return t


def iso_utc(t: datetime) -> str:
    """``t`` in UTC, ISO 8601 with ``Z``."""
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")
