"""The cold-start timeline: ordered phases, durations, JSON round trip, typed errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runtime.coldstart import PHASES, ColdStartTimeline, StageTimeline, TimelineError

T0 = 1_800_000_000.0


def stage(i: int = 0, **over) -> StageTimeline:
    base = dict(stage=i, node=f"n{i}", plan=T0, fetch_start=T0 + 0.01, fetch_end=T0 + 5.0,
                init_start=T0 + 0.02, init_end=T0 + 0.5, load_end=T0 + 5.01, ready=T0 + 5.05,
                first_token=T0 + 5.3, fetch_bytes=550_000_000)
    return StageTimeline(**(base | over))


def test_durations_of_an_overlapped_cold_start():
    d = stage().durations()
    assert d["plan"] == pytest.approx(0.01)
    assert d["fetch"] == pytest.approx(4.99)
    assert d["init"] == pytest.approx(0.48)
    assert d["init_exposed"] == 0.0  # init finished long before the last byte
    assert d["load_lag"] == pytest.approx(0.01)
    assert d["ready_after_load"] == pytest.approx(0.04)
    assert d["prefill"] == pytest.approx(0.25)
    assert d["total"] == pytest.approx(5.3)


def test_init_that_outlasts_the_fetch_is_exposed():
    d = stage(init_end=T0 + 6.0, load_end=T0 + 6.0, ready=T0 + 6.1, first_token=T0 + 6.3
              ).durations()
    assert d["init_exposed"] == pytest.approx(1.0)


def test_partial_timeline_has_only_the_recorded_durations():
    s = StageTimeline(0, "n0", T0, fetch_start=T0 + 0.1)
    assert s.durations() == {"plan": pytest.approx(0.1), "total": pytest.approx(0.1)}
    assert s.offsets()["fetch_start"] == pytest.approx(0.1) and s.offsets()["ready"] is None


def test_out_of_order_phases_are_reported_and_rejected_by_check():
    bad = stage(ready=T0 + 4.0)  # ready before load_end (5.01), after init_end (0.5)
    tl = ColdStartTimeline("m", 1, (bad,))
    assert tl.violations() == [f"stage 0: ready ({T0 + 4.0:.6f}) before load_end "
                               f"({T0 + 5.01:.6f})"]
    with pytest.raises(TimelineError, match="ready .* before load_end"):
        tl.check()
    assert ColdStartTimeline("m", 1, (stage(),)).check().ttft == pytest.approx(5.3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=7, max_size=7))
def test_any_causal_order_passes_and_a_swapped_pair_fails(gaps):
    # build timestamps in one causal order: plan, fetch_start, init_start, init_end, fetch_end,
    # load_end, ready, first_token (cumulative gaps)
    order = ["fetch_start", "init_start", "init_end", "fetch_end", "load_end", "ready",
             "first_token"]
    t, stamps = T0, {}
    for name, gap in zip(order, gaps, strict=True):
        t += gap
        stamps[name] = t
    ok = StageTimeline(0, "n", T0, **stamps)
    assert ok.violations() == []
    if stamps["ready"] - stamps["load_end"] > 0.01:
        swapped = StageTimeline(0, "n", T0, **(stamps | {"ready": stamps["load_end"],
                                                         "load_end": stamps["ready"]}))
        assert any("ready" in v for v in swapped.violations())


def test_json_round_trip_and_first_token_on_every_stage():
    tl = ColdStartTimeline("llama-1b", 2, (stage(0, first_token=None),
                                           stage(1, first_token=None, cache_hit=True)))
    done = tl.with_first_token(T0 + 7.0)
    assert [s.first_token for s in done.stages] == [T0 + 7.0, T0 + 7.0]
    text = done.to_json()
    data = json.loads(text)
    assert set(data["stages"][0]) >= set(PHASES) | {"node", "fetch_bytes", "prestarted"}
    again = ColdStartTimeline.from_json(text)
    assert again == done and again.ttft == pytest.approx(7.0)
    summary = again.summary()
    assert summary["fetch_end"] == pytest.approx(5.0) and summary["prefill"] == pytest.approx(1.95)


def test_stages_must_be_complete_and_share_the_plan():
    with pytest.raises(TimelineError, match=r"stages 0\.\.1 in order, got \[1, 0\]"):
        ColdStartTimeline("m", 2, (stage(1), stage(0)))
    with pytest.raises(TimelineError, match="shares its plan time"):
        ColdStartTimeline("m", 2, (stage(0), stage(1, plan=T0 + 1)))
    with pytest.raises(TimelineError, match="unknown phase 'warmup'"):
        stage().phase("warmup")
    with pytest.raises(TimelineError, match="not a cold-start timeline"):
        ColdStartTimeline.from_dict({"model": "m", "pp": 1})
