"""The cold-start timeline: per-stage phase timestamps and the durations between them (the
platform stores the phases of each stage in its instance's ``timeline`` column).

Every timestamp is wall-clock seconds since the epoch (``time.time()``), so the node agent, the
worker processes and stage 0 can each record their own phases and the pieces still line up.

Phases of one stage, in the order they normally happen::

    plan          the scheduler decided the cold start (same value for every stage of a group)
    fetch_start   the node's prefetcher started fetching this stage's byte ranges
    fetch_end     the last byte arrived and was verified (equal to fetch_start on a cache hit)
    init_start    the runtime began preparing: worker process start when one was spawned for
                  this stage, otherwise the moment a pre-started worker took the assignment
    init_end      device context, KV cache and tokenizer ready (overlaps the fetch)
    load_end      every parameter of the stage materialised from the buffer
    ready         the stage serves (channel connected; on stage 0: the whole ring answered)
    first_token   stage 0 produced the first token of the first request

``init`` and ``fetch`` run concurrently; the exposed cost of a cold start beyond the download is
``load_end - fetch_end`` (how long loading lagged the last byte) plus ``ready`` and prefill.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

PHASES = ("plan", "fetch_start", "fetch_end", "init_start", "init_end", "load_end", "ready",
          "first_token")
# (earlier, later) pairs that must hold for a finished stage; see ``StageTimeline.violations``
ORDER = (("plan", "fetch_start"), ("fetch_start", "fetch_end"), ("plan", "init_start"),
         ("init_start", "init_end"), ("init_end", "ready"), ("fetch_start", "load_end"),
         ("load_end", "ready"), ("ready", "first_token"))
CLOCK_SLACK_S = 0.005  # fetch_end is stamped by a node thread that may run after the loader


class TimelineError(ValueError):
    """A timeline whose phases are missing or out of order; ``status`` for the platform."""

    status = 422

    def __init__(self, message: str, param: str | None = "timeline") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class StageTimeline:
    """Phase timestamps of one stage of one cold start (None: not reached / not recorded)."""

    stage: int
    node: str
    plan: float
    fetch_start: float | None = None
    fetch_end: float | None = None
    init_start: float | None = None
    init_end: float | None = None
    load_end: float | None = None
    ready: float | None = None
    first_token: float | None = None
    fetch_bytes: int = 0
    cache_hit: bool = False
    prestarted: bool = True  # a pool worker took it; False when a process was spawned for it

    def __post_init__(self) -> None:
        if self.stage < 0 or self.fetch_bytes < 0:
            raise TimelineError(f"stage={self.stage} and fetch_bytes={self.fetch_bytes} must be "
                                ">= 0")

    def phase(self, name: str) -> float | None:
        if name not in PHASES:
            raise TimelineError(f"unknown phase {name!r}; phases are {PHASES}", "phase")
        return getattr(self, name)

    def violations(self) -> list[str]:
        """Pairs of recorded phases that are out of order, as readable strings."""
        out = []
        for early, late in ORDER:
            a, b = getattr(self, early), getattr(self, late)
            if a is not None and b is not None and b < a - CLOCK_SLACK_S:
                out.append(f"stage {self.stage}: {late} ({b:.6f}) before {early} ({a:.6f})")
        return out

    def durations(self) -> dict[str, float]:
        """Phase lengths in seconds, for the phases whose ends were recorded.

        fetch, init: the phases themselves; load_lag: load_end - fetch_end (how long loading
        lagged the last byte; ideally ~0); init_exposed: how long init outlasted the fetch;
        ready_after_load: ready - load_end; prefill: first_token - ready; total: up to the
        latest recorded phase, from plan.
        """
        d: dict[str, float] = {}
        _put(d, "plan", self.plan, self.fetch_start)
        _put(d, "fetch", self.fetch_start, self.fetch_end)
        _put(d, "init", self.init_start, self.init_end)
        _put(d, "load_lag", self.fetch_end, self.load_end)
        if self.init_end is not None and self.fetch_end is not None:
            d["init_exposed"] = max(0.0, self.init_end - self.fetch_end)
        _put(d, "ready_after_load", self.load_end, self.ready)
        _put(d, "prefill", self.ready, self.first_token)
        last = max(t for t in (getattr(self, p) for p in PHASES) if t is not None)
        d["total"] = last - self.plan
        return d

    def offsets(self) -> dict[str, float | None]:
        """Each phase as seconds after ``plan`` (what a timeline chart draws)."""
        return {p: None if getattr(self, p) is None else getattr(self, p) - self.plan
                for p in PHASES}


def _put(d: dict[str, float], name: str, start: float | None, end: float | None) -> None:
    if start is not None and end is not None:
        d[name] = end - start


@dataclass(frozen=True, slots=True)
class ColdStartTimeline:
    """All stages of one cold start of ``model`` with pipeline size ``pp``."""

    model: str
    pp: int
    stages: tuple[StageTimeline, ...]

    def __post_init__(self) -> None:
        got = [s.stage for s in self.stages]
        if got != list(range(self.pp)):
            raise TimelineError(f"a pp={self.pp} timeline needs stages 0..{self.pp - 1} in "
                                f"order, got {got}")
        plans = {s.plan for s in self.stages}
        if len(plans) != 1:
            raise TimelineError(f"every stage of one cold start shares its plan time, got "
                                f"{sorted(plans)}")

    @property
    def plan(self) -> float:
        return self.stages[0].plan

    @property
    def ttft(self) -> float | None:
        """Seconds from plan to the first token, when it was produced."""
        first = self.stages[0].first_token
        return None if first is None else first - self.plan

    def with_first_token(self, t: float) -> ColdStartTimeline:
        """The same timeline with ``first_token`` set on every stage."""
        return replace(self, stages=tuple(replace(s, first_token=t) for s in self.stages))

    def violations(self) -> list[str]:
        return [v for s in self.stages for v in s.violations()]

    def check(self) -> ColdStartTimeline:
        """Returns self, or raises ``TimelineError`` listing every out-of-order pair."""
        bad = self.violations()
        if bad:
            raise TimelineError("cold-start phases out of order: " + "; ".join(bad))
        return self

    def summary(self) -> dict[str, float | None]:
        """Group figures: slowest fetch, latest load and ready, TTFT, prefill."""
        def latest(name: str) -> float | None:
            vals = [getattr(s, name) for s in self.stages]
            return None if any(v is None for v in vals) else max(vals) - self.plan

        ready = self.stages[0].ready
        first = self.stages[0].first_token
        return {"fetch_end": latest("fetch_end"), "init_end": latest("init_end"),
                "load_end": latest("load_end"), "ready": latest("ready"),
                "prefill": None if ready is None or first is None else first - ready,
                "ttft": self.ttft}

    def to_dict(self) -> dict:
        return {"model": self.model, "pp": self.pp, "stages": [asdict(s) for s in self.stages]}

    @classmethod
    def from_dict(cls, data: dict) -> ColdStartTimeline:
        known = {f.name for f in fields(StageTimeline)}
        try:
            stages = tuple(StageTimeline(**{k: v for k, v in s.items() if k in known})
                           for s in data["stages"])
            return cls(str(data["model"]), int(data["pp"]), stages)
        except (KeyError, TypeError) as exc:
            raise TimelineError(f"not a cold-start timeline: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ColdStartTimeline:
        return cls.from_dict(json.loads(text))
