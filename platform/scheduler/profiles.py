"""The planner's inputs, measured on the cluster and kept in Postgres (docs/planner.md).

The scheduler leader refreshes them every ``REFRESH_EVERY_S`` from what was served since the
last refresh (a watermark in ``planner_measurements``), so nothing is added to the request
path:
- a model's TPOT per device kind: ``(finished - first token) / (output tokens - 1)`` of the
  requests its whole-model instances (pp = 1) served with at least 2 output tokens;
- its prefill time: ``first token - queued`` of its warm requests (also per prompt token);
- the per-hop cost of a pipeline: what a pp > 1 group's TPOT adds to ``T * inflation`` of the
  same model, per hop;
- the start overhead the fetch does not hide: ``(ready - plan) - (fetch end - fetch start)``
  of every stage that became ready.
Each refresh takes the median of its new samples and averages it with what was known
(``ALPHA``). Until a model or constant has a sample, the planner uses the first guesses
(``actions.Profile``, ``PlannerConfig``). Link throughput is measured by the node agents (the
rate of their last fetches, in each heartbeat) and read by ``scheduler.state``.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from hydraserve.cluster.models import Device, Instance, ModelProfile, Plan, PlannerMeasurement
from hydraserve.db import utcnow
from hydraserve.functions.models import FunctionVersion
from hydraserve.invocations.models import Invocation
from hydraserve.scheduler.planner import PlannerConfig, inflation

REFRESH_EVERY_S = 10.0
ALPHA = 0.5  # weight of a refresh's median against the value known before it
MAX_ROWS = 5000  # finished requests (and ready stages) read per refresh at most
SERVED, STARTED = "profiled_until", "timelines_until"  # the two watermarks
FIRST_LOOK_BACK_S = 3600.0  # how far back the first refresh of a cluster reads


@dataclass(frozen=True, slots=True)
class Group:
    """What a request's stage 0 says about the group that served it."""

    pp: int
    n_full: int
    device_kind: str


def refresh(session: Session) -> int:
    """Folds what was served and started since the last refresh into the measurements;
    commits and returns how many requests and stages it read."""
    first = utcnow().timestamp() - FIRST_LOOK_BACK_S  # a cluster's first refresh
    served = _served_since(session, _value(session, SERVED, first))
    started = _started_since(session, _value(session, STARTED, first))
    session.commit()
    return served + started


def _served_since(session: Session, since: float) -> int:
    rows = session.execute(
        select(Invocation.queued_at, Invocation.first_token_at, Invocation.finished_at,
               Invocation.tokens_in, Invocation.tokens_out, Invocation.cold,
               Invocation.instance_ids, FunctionVersion.model_id)
        .join(FunctionVersion, FunctionVersion.id == Invocation.function_version_id)
        .where(Invocation.status == "succeeded", Invocation.first_token_at.is_not(None),
               Invocation.finished_at > _at(since))
        .order_by(Invocation.finished_at).limit(MAX_ROWS)).all()
    if not rows:
        return 0
    groups = _groups(session, {r.instance_ids[0] for r in rows if r.instance_ids})
    tpot: dict[tuple[int, str], list[float]] = defaultdict(list)
    prefill: dict[tuple[int, str], list[tuple[float, int]]] = defaultdict(list)
    piped: list[tuple[int, str, Group, float]] = []
    for r in rows:
        g = groups.get(r.instance_ids[0]) if r.instance_ids else None
        if g is None:
            continue
        key = (r.model_id, g.device_kind)
        per_token = ((r.finished_at - r.first_token_at).total_seconds() / (r.tokens_out - 1)
                     if (r.tokens_out or 0) >= 2 else None)
        if g.pp == 1:
            if per_token is not None:
                tpot[key].append(per_token)
            if not r.cold:
                prefill[key].append(((r.first_token_at - r.queued_at).total_seconds(),
                                     max(r.tokens_in or 1, 1)))
        elif per_token is not None:
            piped.append((r.model_id, g.device_kind, g, per_token))
    for key in tpot.keys() | prefill.keys():
        _fold_model(session, key, tpot.get(key, []), prefill.get(key, []))
    session.flush()
    _fold_hops(session, piped)
    _set(session, SERVED, rows[-1].finished_at.timestamp(), 0)
    return len(rows)


def _groups(session: Session, stage0_ids: set[int]) -> dict[int, Group]:
    rows = session.execute(
        select(Instance.id, Instance.num_stages, Device.kind, Plan.stages)
        .outerjoin(Device, Device.id == Instance.device_id)
        .outerjoin(Plan, Plan.id == Instance.plan_id)
        .where(Instance.id.in_(stage0_ids))).all()
    return {r.id: Group(r.num_stages, sum(bool(s.get("full_share")) for s in r.stages or []),
                        r.kind or "cpu") for r in rows}


def _fold_model(session: Session, key: tuple[int, str], tpots: list[float],
                prefills: list[tuple[float, int]]) -> None:
    p = session.get(ModelProfile, key) or ModelProfile(model_id=key[0], device_kind=key[1],
                                                       samples=0)
    if tpots:
        p.tpot_s = _blend(p.tpot_s, statistics.median(tpots))
    if prefills:
        p.prefill_s = _blend(p.prefill_s, statistics.median(s for s, _ in prefills))
        p.prefill_s_per_token = _blend(p.prefill_s_per_token,
                                       statistics.median(s / n for s, n in prefills))
    p.samples += len(tpots) + len(prefills)
    p.updated_at = utcnow()
    session.add(p)


def _fold_hops(session: Session, piped: list[tuple[int, str, Group, float]]) -> None:
    known = {(p.model_id, p.device_kind): p.tpot_s for p in session.scalars(
        select(ModelProfile).where(ModelProfile.model_id.in_({m for m, *_ in piped})))}
    hops = [max(0.0, (t - base * inflation(g.pp, g.n_full)) / (g.pp - 1))
            for m, kind, g, t in piped if (base := known.get((m, kind))) is not None]
    if hops:
        _fold(session, "hop_s", statistics.median(hops), len(hops))


def _started_since(session: Session, since: float) -> int:
    rows = session.execute(
        select(Instance.ready_at, Instance.timeline)
        .where(Instance.ready_at > _at(since)).order_by(Instance.ready_at).limit(MAX_ROWS)).all()
    exposed = [max(0.0, (t["ready"] - t["plan"]) - (t["fetch_end"] - t["fetch_start"]))
               for _, t in rows
               if all(isinstance((t or {}).get(k), int | float)
                      for k in ("plan", "fetch_start", "fetch_end", "ready"))]
    if exposed:
        _fold(session, "init_overhead_s", statistics.median(exposed), len(exposed))
    if rows:
        _set(session, STARTED, rows[-1].ready_at.timestamp(), 0)
    return len(rows)


def _fold(session: Session, name: str, sample: float, n: int) -> None:
    m = session.get(PlannerMeasurement, name)
    _set(session, name, _blend(m.value if m else None, sample), (m.samples if m else 0) + n)


def _set(session: Session, name: str, value: float, samples: int) -> None:
    m = session.get(PlannerMeasurement, name) or PlannerMeasurement(name=name, value=value)
    m.value, m.samples, m.updated_at = value, samples, utcnow()
    session.add(m)
    session.flush()


def _value(session: Session, name: str, default: float = 0.0) -> float:
    m = session.get(PlannerMeasurement, name)
    return m.value if m is not None else default


def _blend(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


# ---- what the planner reads ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ModelSpeed:
    tpot_s: float
    prefill_s: float
    measured: bool  # False: the first guesses (no request of the model measured yet)


def model_speed(session: Session, model_id: int, guess_tpot_s: float,
                guess_prefill_s: float) -> ModelSpeed:
    """The model's measured TPOT and prefill time (the slowest device kind measured, so a
    plan holds on any node), else the guesses."""
    rows = session.scalars(select(ModelProfile).where(ModelProfile.model_id == model_id)).all()
    tpot = max((r.tpot_s for r in rows if r.tpot_s is not None), default=None)
    prefill = max((r.prefill_s for r in rows if r.prefill_s is not None), default=None)
    return ModelSpeed(tpot if tpot is not None else guess_tpot_s,
                      prefill if prefill is not None else guess_prefill_s,
                      tpot is not None or prefill is not None)


def planner_config(session: Session, cfg: PlannerConfig) -> PlannerConfig:
    """``cfg`` with the measured start overhead and hop cost, where measured."""
    measured = {m.name: m.value for m in session.scalars(select(PlannerMeasurement).where(
        PlannerMeasurement.name.in_(("init_overhead_s", "hop_s"))))}
    return replace(cfg, init_overhead_s=measured.get("init_overhead_s", cfg.init_overhead_s),
                   hop_s=measured.get("hop_s", cfg.hop_s))
