"""The console's pure figures: percentiles, TTFT against the SLO, phases, stage rows, days."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hydraserve.console.figures import (
    days,
    invocation_phases,
    percentile,
    stage_row,
    ttft_summary,
)

T0 = datetime(2026, 11, 1, 10, tzinfo=UTC)


def test_percentile_is_nearest_rank():
    values = [1000, 50, 60, 70, 2000]
    assert [percentile(values, p) for p in (20, 50, 60, 90, 99, 100)] == [50, 70, 70, 2000,
                                                                          2000, 2000]
    assert percentile([], 50) is None


@given(st.lists(st.floats(0, 1e6), min_size=1), st.floats(0.1, 100))
def test_percentile_is_a_value_with_enough_below(values, p):
    got = percentile(values, p)
    assert got in values
    assert sum(v <= got for v in values) >= p / 100 * len(values) - 1e-9


def test_ttft_summary_counts_the_slo_of_each_version():
    s = ttft_summary([(100, 200), (300, 200), (300, 500)])
    assert (s.count, s.within_slo, round(s.within_slo_pct, 1)) == (3, 2, 66.7)
    assert ttft_summary([]).within_slo_pct is None


def test_phases_of_a_cold_and_a_warm_invocation():
    ms = lambda n: T0 + timedelta(milliseconds=n)  # noqa: E731
    cold = {"queued_at": T0, "planned_at": ms(100), "fetched_at": ms(600),
            "loaded_at": ms(900), "first_token_at": ms(1000), "finished_at": ms(1500)}
    assert invocation_phases(cold) == {"plan": 100, "fetch": 500, "load": 300, "prefill": 100,
                                       "decode": 500}
    warm = {"queued_at": T0, "first_token_at": ms(40), "finished_at": None}
    assert invocation_phases(warm) == {"plan": 0, "fetch": 0, "load": 0, "prefill": 40,
                                       "decode": 0}
    # joined a cold start planned before it was queued: the plan phase is 0, not negative
    joined = cold | {"planned_at": T0 - timedelta(seconds=1)}
    assert invocation_phases(joined)["plan"] == 0 and invocation_phases(joined)["fetch"] == 600


def test_stage_row_from_an_instance_timeline():
    t = T0.timestamp()
    row = stage_row(1, {"plan": t + 0.1, "fetch_start": t + 0.15, "fetch_end": t + 0.6,
                        "ready": t + 0.95}, T0)
    assert row.label == "stage 1" and row.offset_ms == pytest.approx(100)
    assert {k: round(v) for k, v in row.phases_ms.items()} == {
        "plan": 50, "fetch": 450, "load": 350, "prefill": 0, "decode": 0}
    assert stage_row(0, {}, T0) is None  # no plan recorded: no row


def test_days_of_a_window():
    start = datetime(2026, 11, 1, tzinfo=UTC)
    assert [d.day for d in days(start, start + timedelta(days=3))] == [1, 2, 3]
    assert [d.day for d in days(start + timedelta(hours=23), start + timedelta(hours=25))] == [1, 2]
