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


def target_of(stages: Sequence[dict], model_bytes: int, enabled: bool) -> tuple[int | None, str]:
    """(the pipeline size a group of ``stages`` (the plan's records) turns into, or None; why).
    Today the target is the whole model on stage 0, which needs its full share."""
    pp = len(stages)
    if pp < 2:
        return None, "a standalone instance: nothing to consolidate"
    if not enabled:
        return None, "consolidation is turned off (HYDRA_CONSOLIDATION=off)"
    head = stages[0]
    if head["full_share"] and head["memory_bytes"] >= model_bytes:
        return 1, (f"stage 0 holds a full share ({head['memory_bytes'] / GB:.3f} GB for a "
                   f"{model_bytes / GB:.3f} GB model): it becomes a standalone replica")
    return None, (f"no worker holds the whole model: stage 0 has {head['memory_bytes'] / GB:.3f}"
                  f" GB of a part share for a {model_bytes / GB:.3f} GB model (consolidating "
                  "into a smaller pipeline is not built yet)")


def set_state(session: Session, plan_id: int, state: str, reason: str | None = None,
              stats: dict[str, Any] | None = None) -> None:
    """Moves the plan's consolidation to ``state`` (stamping its start or end) and merges
    ``stats``; no commit."""
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
    session.execute(update(Plan).where(Plan.id == plan_id).values(**values))


def add_stats(session: Session, plan_id: int, stats: dict[str, Any]) -> None:
    """Merges ``stats`` into the plan's consolidation record, and commits."""
    session.execute(update(Plan).where(Plan.id == plan_id).values(
        consolidation=Plan.consolidation.op("||")(cast(stats, JSONB))))
    session.commit()


def give_up(session: Session, plan_id: int, cause: str, stats: dict | None = None) -> None:
    """The group tried and stays a pipeline; commits."""
    set_state(session, plan_id, "failed", cause, stats)
    session.commit()


def switched(session: Session, group: Sequence[int], stats: dict[str, Any]) -> list[int]:
    """Stage 0 (``group[0]``) now holds the whole model: it becomes a standalone instance and
    the other stages go ``stopping``, so that their exit is a release (their usage records
    close when their processes end). Commits before any stage is told to stop; returns the
    stages released."""
    head = must_get(session, Instance, group[0])
    assert head.plan_id is not None, f"instance {head.id} has no plan"
    rest = list(session.scalars(select(Instance).where(
        Instance.id.in_(group[1:]), Instance.status.in_(LIVE))))
    for inst in rest:
        inst.status = "stopping"
    head.num_stages = 1
    set_state(session, head.plan_id, "consolidated", stats=stats)
    notify(session, f"consolidated:{head.plan_id}")
    session.commit()
    return [i.id for i in rest]


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
