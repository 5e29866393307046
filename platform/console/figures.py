"""The console's figures, pure: TTFT percentiles against an SLO, an invocation's phases and its
stages' timelines as chart rows, a day series without gaps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

# the phases of an invocation, in order, each ending at the timestamp named
PHASES = (("plan", "planned_at"), ("fetch", "fetched_at"), ("load", "loaded_at"),
          ("prefill", "first_token_at"), ("decode", "finished_at"))
PHASE_NAMES = tuple(p for p, _ in PHASES)
PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of ``values`` (None when empty): the smallest value
    at least ``p`` percent of the values are at or below."""
    assert 0 < p <= 100, f"percentile {p} is not in (0, 100]"
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1]


@dataclass(frozen=True, slots=True)
class TtftSummary:
    """TTFTs of some invocations against the SLO of the version each ran."""

    count: int
    percentiles_ms: dict[int, float | None]
    within_slo: int  # how many met their version's ttft_ms

    @property
    def within_slo_pct(self) -> float | None:
        return None if self.count == 0 else 100.0 * self.within_slo / self.count


def ttft_summary(samples: Sequence[tuple[float, int]]) -> TtftSummary:
    """``samples``: (ttft_ms, slo_ttft_ms) of each invocation that produced a first token."""
    ttfts = [t for t, _ in samples]
    return TtftSummary(len(ttfts), {p: percentile(ttfts, p) for p in PERCENTILES},
                       sum(1 for t, slo in samples if t <= slo))


@dataclass(frozen=True, slots=True)
class TimelineRow:
    """One bar of a timeline chart: an offset (not drawn) then each phase's length, in ms after
    the invocation was queued."""

    label: str
    offset_ms: float
    phases_ms: dict[str, float]  # by PHASE_NAMES; 0 for a phase the row does not have


def invocation_phases(stamps: dict[str, datetime | None]) -> dict[str, float]:
    """Phase lengths (ms) from an invocation's timestamps (``queued_at`` and the ends in
    ``PHASES``): each phase runs from the previous recorded end (or the queueing, if later) to
    its own end; a phase whose end was not recorded is 0 (a warm invocation has no plan, fetch
    or load)."""
    prev = stamps["queued_at"]
    assert prev is not None, "an invocation always has queued_at"
    out: dict[str, float] = {}
    for phase, attr in PHASES:
        at = stamps.get(attr)
        if at is None:
            out[phase] = 0.0
            continue
        out[phase] = max((at - prev).total_seconds() * 1000, 0.0)
        prev = max(prev, at)
    return out


def stage_row(stage: int, timeline: dict, queued_at: datetime) -> TimelineRow | None:
    """A stage's bar from its instance's timeline (epoch seconds, gpu_runtime/coldstart/
    timeline.py): plan to fetch start, the fetch, fetch end to ready (loading past the last
    byte and the ring coming up), ready to first token. None without a plan time."""
    plan = timeline.get("plan")
    if not isinstance(plan, int | float):
        return None
    base = queued_at.timestamp()
    marks = [plan] + [timeline.get(k) for k in ("fetch_start", "fetch_end", "ready",
                                                  "first_token")]
    lengths: list[float] = []
    prev = float(plan)
    for t in marks[1:]:
        if not isinstance(t, int | float):
            lengths.append(0.0)
            continue
        lengths.append(max((t - prev) * 1000, 0.0))
        prev = max(prev, float(t))
    phases = dict.fromkeys(PHASE_NAMES, 0.0)
    phases.update(zip(("plan", "fetch", "load", "prefill"), lengths, strict=True))
    return TimelineRow(f"stage {stage}", max((plan - base) * 1000, 0.0), phases)


def days(start: datetime, end: datetime) -> list[date]:
    """The UTC days a window ``[start, end)`` touches, in order."""
    first, out = start.date(), []
    last = (end - timedelta(microseconds=1)).date()
    while first <= last:
        out.append(first)
        first += timedelta(days=1)
    return out
