"""The memory-time arithmetic alone: cuts, exact seconds, the one rounding step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from hydraserve.billing.cost import Amounts, PriceSpan, cut, price_at, round_amount, seconds

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def test_cut_at_midnight_and_at_a_price_change():
    prices = [PriceSpan(T0, T0 + timedelta(hours=30), Decimal("0.000001")),
              PriceSpan(T0 + timedelta(hours=30), None, Decimal("0.000002"))]
    pieces = cut(T0 + timedelta(hours=20), T0 + timedelta(hours=32), prices)
    assert [(p.start - T0, p.end - T0, p.usd_per_gb_second) for p in pieces] == [
        (timedelta(hours=20), timedelta(hours=24), Decimal("0.000001")),
        (timedelta(hours=24), timedelta(hours=30), Decimal("0.000001")),
        (timedelta(hours=30), timedelta(hours=32), Decimal("0.000002"))]
    assert [str(p.day) for p in pieces] == ["2026-03-01", "2026-03-02", "2026-03-02"]


def test_seconds_are_exact_to_the_microsecond():
    assert seconds(timedelta(days=2, seconds=5, microseconds=7)) == Decimal("172805.000007")
    assert seconds(timedelta(microseconds=1)) == Decimal("0.000001")


def test_rounding_is_half_to_even_at_six_places():
    assert [str(round_amount(Decimal(v))) for v in (
        "0.0150125", "0.0150135", "0.0000005", "0.0000015", "2.49999949", "7")] == [
        "0.015012", "0.015014", "0.000000", "0.000002", "2.499999", "7.000000"]


def test_no_price_in_force_is_none_and_an_ended_price_ends():
    ended = [PriceSpan(T0, T0 + timedelta(days=1), Decimal("0.1"))]
    assert price_at(T0 - timedelta(microseconds=1), ended) is None
    assert price_at(T0, ended) == Decimal("0.1")
    assert price_at(T0 + timedelta(days=1), ended) is None


instants = st.integers(min_value=0, max_value=4 * 86_400 * 10**6).map(
    lambda us: T0 + timedelta(microseconds=us))
memory = st.decimals(min_value=Decimal("0.0001"), max_value=Decimal("200000"), places=4)
price = st.decimals(min_value=Decimal(0), max_value=Decimal("999999.9999999999"), places=10)


@st.composite
def price_chains(draw) -> list[PriceSpan]:
    """Prices that follow each other without gaps, the last open or ended."""
    starts = sorted(set(draw(st.lists(instants, max_size=5))))
    if not starts:
        return []
    ends: list[datetime | None] = [*starts[1:], None]
    if draw(st.booleans()):
        ends[-1] = starts[-1] + timedelta(hours=draw(st.integers(1, 48)))
    return [PriceSpan(a, b, draw(price)) for a, b in zip(starts, ends, strict=True)]


@given(start=instants, end=instants, prices=price_chains())
def test_pieces_tile_the_interval_inside_days_at_one_price(start, end, prices):
    pieces = cut(start, end, prices)
    if end <= start:
        assert pieces == []
        return
    assert pieces[0].start == start and pieces[-1].end == end
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:], strict=False))
    for p in pieces:
        assert p.start < p.end and p.day == (p.end - timedelta(microseconds=1)).date(), p
        last = p.end - timedelta(microseconds=1)
        assert p.usd_per_gb_second == price_at(p.start, prices) == price_at(last, prices), p
    assert sum((p.seconds for p in pieces), Decimal(0)) == seconds(end - start)


@given(start=instants, split=instants, end=instants, gb=memory, prices=price_chains())
def test_charging_in_two_parts_is_charging_once(start, split, end, gb, prices):
    """Exact arithmetic: a record cut anywhere costs what it costs whole, to the last digit,
    and its GB-seconds split into priced and unpriced parts."""
    start, split, end = sorted((start, split, end))
    whole, parts = Amounts(), Amounts()
    for p in cut(start, end, prices):
        whole.add(p, gb)
    for p in cut(start, split, prices) + cut(split, end, prices):
        parts.add(p, gb)
    assert (whole.gb_seconds, whole.unpriced_gb_seconds, whole.cost_usd) == (
        parts.gb_seconds, parts.unpriced_gb_seconds, parts.cost_usd)
    assert whole.gb_seconds == gb * seconds(end - start)
    assert whole.unpriced_gb_seconds <= whole.gb_seconds
