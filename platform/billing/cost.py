"""Memory-time arithmetic, pure: a usage interval cut at UTC midnights and price changes, each
piece's GB-seconds and charge, and the one rounding step (docs/billing.md).

Everything is ``Decimal`` and exact until ``round_amount``: seconds come from the timestamps'
microseconds, memory from ``Numeric(12, 4)``, prices from ``Numeric(16, 10)``, so a product has
at most 20 decimal places and ``EXACT`` (60 digits, ``Inexact`` trapped) never rounds; if it
ever had to, the arithmetic raises instead of charging a rounded figure silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import (
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)

EXACT = Context(prec=60, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])
PLACES = 6  # decimal places of every reported figure
QUANTUM = Decimal(1).scaleb(-PLACES)  # 0.000001
ROUNDING = ROUND_HALF_EVEN
ZERO = Decimal(0)
DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class PriceSpan:
    """A price of one device kind over ``[start, end)``; ``end`` None: open-ended."""

    start: datetime
    end: datetime | None
    usd_per_gb_second: Decimal

    def covers(self, t: datetime) -> bool:
        return self.start <= t and (self.end is None or t < self.end)


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of a usage interval inside one UTC day with one price in force (or none)."""

    start: datetime
    end: datetime
    usd_per_gb_second: Decimal | None  # None: no price in force

    @property
    def day(self) -> date:
        return self.start.astimezone(UTC).date()

    @property
    def seconds(self) -> Decimal:
        return seconds(self.end - self.start)


def seconds(span: timedelta) -> Decimal:
    """``span`` in seconds, exactly (timedelta counts whole microseconds)."""
    whole = span.days * 86_400 + span.seconds
    return Decimal(whole) + Decimal(span.microseconds).scaleb(-6)


def next_midnight(t: datetime) -> datetime:
    """The first UTC midnight after ``t``."""
    return datetime.combine(t.astimezone(UTC).date() + DAY, time(0), tzinfo=UTC)


def cut(start: datetime, end: datetime, prices: Sequence[PriceSpan]) -> list[Piece]:
    """``[start, end)`` cut at every UTC midnight and every start and end of a price inside it;
    each piece carries the price in force over it. Empty for ``end <= start``."""
    if end <= start:
        return []
    cuts = {start, end}
    midnight = next_midnight(start)
    while midnight < end:
        cuts.add(midnight)
        midnight += DAY
    for p in prices:
        cuts.update(t for t in (p.start, p.end) if t is not None and start < t < end)
    bounds = sorted(cuts)
    return [Piece(a, b, price_at(a, prices)) for a, b in zip(bounds, bounds[1:], strict=False)]


def price_at(t: datetime, prices: Sequence[PriceSpan]) -> Decimal | None:
    """The price in force at ``t`` (the latest to start, should two cover it), or None."""
    covering = [p for p in prices if p.covers(t)]
    return max(covering, key=lambda p: p.start).usd_per_gb_second if covering else None


@dataclass(slots=True)
class Amounts:
    """Exact sums of one report row (or of anything): memory-time, the part of it no price
    covered, and the charge for the rest; ``open`` when some of it was charged up to now."""

    gb_seconds: Decimal = ZERO
    unpriced_gb_seconds: Decimal = ZERO
    cost_usd: Decimal = ZERO
    open: bool = False

    def add(self, piece: Piece, memory_gb: Decimal, is_open: bool = False) -> None:
        with localcontext(EXACT):
            gb_s = memory_gb * piece.seconds
            self.gb_seconds += gb_s
            if piece.usd_per_gb_second is None:
                self.unpriced_gb_seconds += gb_s
            else:
                self.cost_usd += gb_s * piece.usd_per_gb_second
        self.open = self.open or is_open

    def merge(self, other: Amounts) -> None:
        with localcontext(EXACT):
            self.gb_seconds += other.gb_seconds
            self.unpriced_gb_seconds += other.unpriced_gb_seconds
            self.cost_usd += other.cost_usd
        self.open = self.open or other.open

    def rounded(self) -> Amounts:
        """Each figure rounded once to ``PLACES`` places, half to even."""
        return Amounts(round_amount(self.gb_seconds), round_amount(self.unpriced_gb_seconds),
                       round_amount(self.cost_usd), self.open)


def round_amount(value: Decimal) -> Decimal:
    """``value`` to ``PLACES`` decimal places, half to even (the only rounding billing does)."""
    return value.quantize(QUANTUM, rounding=ROUNDING, context=Context(prec=60))


def decimal_text(value: Decimal) -> str:
    """A decimal as plain digits (never exponent notation: ``0E-10`` is written 0.0000000000)."""
    return format(value, "f")
