"""Bookkeeping of serving workers in Postgres: invocation start and end, group readiness,
activity. Called from worker processes; every write commits at once, since a worker may die."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import cast, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from hydraserve.db.base import utcnow
from hydraserve.db.cluster import Instance, Plan
from hydraserve.db.serving import Invocation
from hydraserve.services.invocations import FINISHED, notify

MAX_ATTEMPTS = 3  # deliveries of one invocation before it is failed for good


def begin(session: Session, inv_ids: list[str], group: tuple[int, ...],
          ready_at: datetime) -> set[str]:
    """Claims invocations for this group in one transaction; returns the ids to run. Skipped:
    those already finished (a redelivery) and those out of attempts (failed here, with why).
    One query on the warm path; the cold-start timestamps are read only for a cold request."""
    invs = session.scalars(select(Invocation).where(Invocation.id.in_(inv_ids))
                           .with_for_update()).all()
    claimed = set()
    for inv in invs:
        if inv.status in FINISHED:
            continue
        inv.attempts += 1
        if inv.attempts > MAX_ATTEMPTS:
            inv.status, inv.finished_at = "failed", utcnow()
            inv.error = {"type": "service_unavailable", "param": None,
                         "message": f"gave up after {MAX_ATTEMPTS} attempts: the workers "
                                    "serving it stopped before it finished"}
            continue
        inv.status, inv.instance_ids = "running", list(group)
        inv.cold = ready_at > inv.queued_at
        if inv.cold:
            inv.planned_at, inv.fetched_at = cold_start_times(session, group)
            inv.loaded_at = ready_at
        claimed.add(inv.id)
    session.commit()
    return claimed


def cold_start_times(session: Session, group: tuple[int, ...]) -> tuple[datetime | None,
                                                                        datetime | None]:
    """When the group's plan was made, and when its last stage's bytes had arrived."""
    lead = session.get(Instance, group[0])
    plan = session.get(Plan, lead.plan_id) if lead.plan_id else None
    fetch_ends = [t for i in session.scalars(select(Instance).where(Instance.id.in_(group)))
                  if (t := (i.timeline or {}).get("fetch_end"))]
    return (plan.created_at if plan else None), _at(max(fetch_ends, default=None))


def _at(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=UTC) if value else None


@dataclass(frozen=True, slots=True)
class Outcome:
    inv_id: str
    output: dict
    tokens_in: int
    tokens_out: int
    first_token_at: datetime | None


def complete(session: Session, outcomes: list[Outcome]) -> None:
    """Records finished invocations in one transaction (a cancel that came first is kept)."""
    invs = {i.id: i for i in session.scalars(select(Invocation).where(
        Invocation.id.in_([o.inv_id for o in outcomes])).with_for_update())}
    now = utcnow()
    for o in outcomes:
        inv = invs.get(o.inv_id)
        if inv is None or inv.status in FINISHED:
            continue
        inv.status, inv.output, inv.finished_at = "succeeded", o.output, now
        inv.tokens_in, inv.tokens_out = o.tokens_in, o.tokens_out
        inv.first_token_at = o.first_token_at
    session.commit()


def fail(session: Session, inv_id: str, kind: str, message: str, param: str | None) -> None:
    inv = session.get(Invocation, inv_id)
    if inv is not None and inv.status not in FINISHED:
        inv.status, inv.finished_at = "failed", utcnow()
        inv.error = {"type": kind, "message": message, "param": param}
    session.commit()


def cancelled(session: Session, inv_ids: list[str]) -> set[str]:
    if not inv_ids:
        return set()
    rows = session.scalars(select(Invocation.id).where(Invocation.id.in_(inv_ids),
                                                       Invocation.status == "cancelled"))
    ids = set(rows)
    session.commit()
    return ids


def mark_ready(session: Session, group: tuple[int, ...], timeline: dict) -> datetime:
    """Marks the group ready now; returns that time (the worker's cold/warm line)."""
    now = utcnow()
    session.execute(update(Instance).where(Instance.id.in_(group), Instance.status == "starting")
                    .values(status="ready", ready_at=now, last_active_at=now))
    add_timeline(session, group[0], timeline)
    notify(session, f"ready:{group[0]}")
    session.commit()
    return now


def add_timeline(session: Session, instance_id: int, phases: dict) -> None:
    """Merges phase timestamps into an instance's timeline (one atomic jsonb update: the node
    agent and the worker both write theirs); no commit."""
    session.execute(update(Instance).where(Instance.id == instance_id).values(
        timeline=Instance.timeline.op("||")(cast(phases, JSONB))))


def touch(session: Session, group: tuple[int, ...]) -> None:
    session.execute(update(Instance).where(Instance.id.in_(group))
                    .values(last_active_at=utcnow()))
    session.commit()


def instance_status(session: Session, instance_id: int) -> str:
    status = session.scalar(select(Instance.status).where(Instance.id == instance_id))
    session.commit()
    return status or "released"
