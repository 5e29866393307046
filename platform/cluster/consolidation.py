"""A pipeline group's consolidation, Postgres side (docs/consolidation.md): the target decided
when the group is planned, the state from ``ready`` on, and what the switch did.

States: ``consolidating`` (the rest of the model is on its way to stage 0), ``consolidated``
(stage 0 serves the whole model; the other stages were released), ``skipped`` (the group
stays a pipeline, with the reason), ``failed`` (it tried and stays a pipeline, with the cause).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import cast, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from gpu_runtime.limits import GB
from hydraserve.cluster.models import CONSOLIDATION, LIVE, Instance, Plan
from hydraserve.db import must_get, notify, utcnow


def holds_whole_model(stage: dict, model_bytes: int) -> bool:
    """Whether a stage's record (``full_share``, ``memory_bytes``) leaves room for the whole
    model: such a stage can stand alone once its pipeline consolidates."""
    return bool(stage["full_share"]) and stage["memory_bytes"] >= model_bytes


def target_of(stages: Sequence[dict], model_bytes: int, enabled: bool) -> tuple[int | None, str]:
    """(the pipeline size a group of ``stages`` (the plan's records) turns into, or None; why).
    Today the target is the whole model on stage 0, which needs its full share."""
    pp = len(stages)
    if pp < 2:
        return None, "a standalone instance: nothing to consolidate"
    if not enabled:
        return None, "consolidation is turned off (HYDRA_CONSOLIDATION=off)"
    head = stages[0]
    if holds_whole_model(head, model_bytes):
        return 1, (f"stage 0 holds a full share ({head['memory_bytes'] / GB:.3f} GB for a "
                   f"{model_bytes / GB:.3f} GB model): it becomes a standalone replica")
    return None, (f"no worker holds the whole model: stage 0 has {head['memory_bytes'] / GB:.3f}"
                  f" GB of a part share for a {model_bytes / GB:.3f} GB model (consolidating "
                  "into a smaller pipeline is not built yet)")


def set_state(session: Session, plan_id: int, state: str, reason: str | None = None,
              stats: dict[str, Any] | None = None, only_from: str | None = None) -> None:
    """Moves the plan's consolidation to ``state`` (stamping its start or end) and merges
    ``stats`` (``only_from``: only if it is in that state now); no commit."""
    assert state in CONSOLIDATION, f"consolidation state {state!r}; allowed {CONSOLIDATION}"
    values: dict[str, Any] = {"consolidation_state": state}
    if reason is not None:
        values["consolidation_reason"] = reason[:512]
    if state == "consolidating":
        values["consolidation_started_at"] = utcnow()
    if state == "consolidated":
        values["consolidated_at"] = utcnow()
    if stats:
        values["consolidation"] = Plan.consolidation.op("||")(cast(stats, JSONB))
    q = update(Plan).where(Plan.id == plan_id)
    if only_from is not None:
        q = q.where(Plan.consolidation_state == only_from)
    session.execute(q.values(**values))


def end_orphans(session: Session) -> list[int]:
    """Consolidations still under way whose group has no live instance left (every stage
    exited or was closed before the switch, by any path) end ``failed``; their plan ids. No
    commit."""
    live = select(Instance.id).where(Instance.plan_id == Plan.id, Instance.status.in_(LIVE))
    rows = session.execute(
        update(Plan).where(Plan.consolidation_state == "consolidating", ~live.exists())
        .values(consolidation_state="failed",
                consolidation_reason="the group ended before its switch")
        .returning(Plan.id))
    return [r[0] for r in rows]


def add_stats(session: Session, plan_id: int, stats: dict[str, Any]) -> None:
    """Merges ``stats`` into the plan's consolidation record, and commits."""
    session.execute(update(Plan).where(Plan.id == plan_id).values(
        consolidation=Plan.consolidation.op("||")(cast(stats, JSONB))))
    session.commit()


def give_up(session: Session, plan_id: int, cause: str, stats: dict | None = None) -> None:
    """The group tried and stays a pipeline (unless its consolidation ended otherwise first:
    the first cause is kept); commits."""
    set_state(session, plan_id, "failed", cause, stats, only_from="consolidating")
    session.commit()


def switched(session: Session, group: Sequence[int], stats: dict[str, Any]) -> list[int]:
    """Stage 0 (``group[0]``) now holds the whole model: it becomes a standalone instance and
    the other stages go ``stopping``, so that their exit is a release (their usage records
    close when their processes end), except the stages that become replicas (they move to
    plans of their own, ``become_replica``). Commits before any stage is told to stop;
    returns the stages released."""
    head = must_get(session, Instance, group[0])
    assert head.plan_id is not None, f"instance {head.id} has no plan"
    plan = must_get(session, Plan, head.plan_id)
    keep = set((plan.consolidation or {}).get("replica_stages", []))
    rest = [i for i in session.scalars(select(Instance).where(
        Instance.id.in_(group[1:]), Instance.status.in_(LIVE))) if i.stage_index not in keep]
    for inst in rest:
        inst.status = "stopping"
    head.num_stages = 1
    set_state(session, head.plan_id, "consolidated", stats=stats)
    notify(session, f"consolidated:{head.plan_id}")
    session.commit()
    return [i.id for i in rest]


def become_replica(session: Session, instance_id: int) -> bool:
    """A later full-share stage of a consolidated group stands alone: it moves to a plan of
    its own (``pp = 1``, the same policy, its placement as stage 0), keeping its instance row
    and usage record. False (nothing changed) unless its group consolidated and it is still
    ``ready`` (a group stopped before the switch makes no replica). Commits."""
    inst = session.get(Instance, instance_id, with_for_update=True)
    if inst is None or inst.status != "ready" or inst.plan_id is None:
        session.rollback()
        return False
    old = must_get(session, Plan, inst.plan_id)
    if old.consolidation_state != "consolidated" or inst.stage_index == 0:
        session.rollback()
        return False
    stage = next(s for s in old.stages if s["stage"] == inst.stage_index)
    plan = Plan(function_version_id=old.function_version_id, pp=1, status="started",
                policy=old.policy, reason=f"replica of plan {old.id}: its stage "
                f"{inst.stage_index} held a full share and stands alone since the pipeline "
                "consolidated", predicted_ttft_ms=old.predicted_ttft_ms,
                predicted_tpot_ms=old.predicted_tpot_ms, stages=[stage | {"stage": 0}])
    session.add(plan)
    session.flush()
    inst.plan_id, inst.stage_index, inst.num_stages = plan.id, 0, 1
    replicas = dict(old.consolidation or {}).get("replica_plans", []) + [plan.id]
    set_state(session, old.id, "consolidated", stats={"replica_plans": replicas})
    notify(session, f"replica:{plan.id}")
    session.commit()
    return True


def replica_stages(stages: Sequence[dict], model_bytes: int) -> list[int]:
    """The later stages of a group that become replicas when it consolidates: those holding a
    full share (the whole model fits their memory)."""
    return [s["stage"] for s in stages[1:] if holds_whole_model(s, model_bytes)]


def record_of(plan: Plan) -> dict[str, Any] | None:
    """The consolidation block of the instance and invocation APIs (None for a plan that never
    had anything to consolidate)."""
    if plan.consolidation_state is None and plan.consolidation_target is None \
            and plan.consolidation_reason is None:
        return None
    return {"state": plan.consolidation_state or "pending", "target_pp": plan.consolidation_target,
            "reason": plan.consolidation_reason,
            "started_at": _iso(plan.consolidation_started_at),
            "consolidated_at": _iso(plan.consolidated_at), "stats": plan.consolidation or {}}


def _iso(at) -> str | None:
    return at.isoformat() if at is not None else None
