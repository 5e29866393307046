"""Invocation use cases: accept (row + durable message), read, cancel; and for the scheduler,
queued demand, expiry of requests never started, and requeueing of those whose group died."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from pika.exceptions import AMQPError
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from hydraserve.broker import Publisher, request_queue
from hydraserve.cluster.models import CLOSED, Instance
from hydraserve.db import EVENTS_CHANNEL, must_get, utcnow
from hydraserve.errors import NotFound, RateLimited, ServiceUnavailable
from hydraserve.functions.models import FunctionVersion
from hydraserve.functions.service import Target
from hydraserve.invocations.models import FINISHED, Invocation
from hydraserve.invocations.schemas import MAX_SEED, InvokeRequest
from hydraserve.tenants import limits
from hydraserve.tenants.service import Principal

ACCEPTED = ("id", "tenant_id", "function_id", "function_version_id", "status", "attempts",
            "request", "instance_ids", "queued_at")  # the columns a new invocation is written with


def new_id() -> str:
    return "inv_" + uuid.uuid4().hex


def is_finished(inv: Invocation) -> bool:
    """True once the invocation has its outcome (it never changes after that)."""
    return inv.status in FINISHED


def _accept_statement():
    """INSERT the row and NOTIFY the scheduler, one statement; built once (every request)."""
    columns = Invocation.__table__.c
    row = insert(Invocation).values({c: bindparam(c, type_=columns[c].type) for c in ACCEPTED})
    return select(func.pg_notify(EVENTS_CHANNEL, bindparam("event"))).select_from(
        row.returning(Invocation.function_id).cte("accepted"))


ACCEPT = _accept_statement()


def accept(session: Session, publisher: Publisher, who: Principal, target: Target,
           body: InvokeRequest, kind: str, inv_id: str, reply_to: str | None,
           prefix: str = "", stream: bool = False,
           cluster_max_in_flight: int = 0) -> Invocation:
    """Stores the invocation, then publishes it; if the broker refuses, the row records why.
    Subscribe to ``inv_id``'s replies before calling this, so no event is missed. With
    ``stream`` the worker sends every token; without, only the final ``done``/``error``.

    The row is written by one statement that also notifies the scheduler, run on the session's
    Core connection (no ORM execution context, ~50 us less per statement), and the returned
    Invocation is not attached to the session (this runs on every request)."""
    request = {"kind": kind, **body.model_dump(exclude_none=True)}
    if body.temperature > 0 and body.seed is None:
        # a retry after a worker death must generate the same tokens, so that a stream resumes
        # where it was instead of sending other text: sampled requests get a seed here
        request["seed"] = secrets.randbelow(MAX_SEED + 1)
    inv = Invocation(id=inv_id, tenant_id=who.tenant_id, function_id=target.function_id,
                     function_version_id=target.version_id, status="queued", attempts=0,
                     request=request,
                     instance_ids=[], queued_at=utcnow())
    try:
        limits.admit(session.connection(), who.tenant_id, who.limits, target.version_id,
                     target.max_concurrency, cluster_max_in_flight)
    except RateLimited:
        session.rollback()  # releases the tenant's admission lock at once
        raise
    session.connection().execute(ACCEPT, {c: getattr(inv, c) for c in ACCEPTED}
                                 | {"event": f"queued:{target.function_id}"})
    session.commit()
    message = {"id": inv.id, "function_version_id": target.version_id, "request": inv.request,
               "stream": stream}
    try:
        publisher.publish(request_queue(target.function_id, target.version, prefix), message,
                          reply_to=reply_to, correlation_id=inv.id)
    except (AMQPError, OSError) as exc:  # record it: nothing is silently lost
        inv.status, inv.finished_at = "failed", utcnow()
        inv.error = {"type": "service_unavailable", "param": None,
                     "message": f"message broker unavailable: {type(exc).__name__}"}
        session.execute(update(Invocation).where(Invocation.id == inv.id).values(
            status=inv.status, finished_at=inv.finished_at, error=inv.error))
        session.commit()
        raise ServiceUnavailable("the message broker is unavailable; retry shortly") from None
    return inv


def get(session: Session, who: Principal, invocation_id: str) -> Invocation:
    inv = session.scalar(select(Invocation).where(Invocation.id == invocation_id,
                                                  Invocation.tenant_id == who.tenant_id))
    if inv is None:
        raise NotFound(f"invocation {invocation_id!r} not found", "id")
    return inv


def cancel(session: Session, inv: Invocation) -> None:
    """Marks an unfinished invocation cancelled (one conditional UPDATE, so a result committed
    meanwhile wins); the worker aborts it at its next check."""
    session.execute(update(Invocation).where(Invocation.id == inv.id,
                                             Invocation.status.not_in(FINISHED))
                    .values(status="cancelled", finished_at=utcnow()))
    session.commit()
    session.refresh(inv)


def function_of(session: Session, inv: Invocation) -> tuple[str, int]:
    """(function name, version number) an invocation ran against."""
    version = must_get(session, FunctionVersion, inv.function_version_id)
    return version.function.name, version.version


@dataclass(frozen=True, slots=True)
class Demand:
    function_version_id: int
    queued: int
    oldest_queued_at: datetime


def queued_demand(session: Session, function_ids: set[int] | None = None) -> list[Demand]:
    """Queued requests per function version (of ``function_ids`` only, when given)."""
    q = (select(Invocation.function_version_id, func.count(), func.min(Invocation.queued_at))
         .where(Invocation.status == "queued").group_by(Invocation.function_version_id))
    if function_ids is not None:
        q = q.where(Invocation.function_id.in_(function_ids))
    return [Demand(*row) for row in session.execute(q)]


def expire_queued(session: Session, max_queue_s: float) -> int:
    """Fails invocations queued longer than ``max_queue_s``, with the reason: no capacity came,
    or their message was lost (an API process died between commit and publish)."""
    cutoff = utcnow() - timedelta(seconds=max_queue_s)
    expired = session.scalars(select(Invocation).where(
        Invocation.status == "queued", Invocation.queued_at < cutoff)
        .with_for_update(skip_locked=True)).all()
    for inv in expired:
        inv.status, inv.finished_at = "failed", utcnow()
        inv.error = {"type": "service_unavailable", "param": None,
                     "message": f"not started within {max_queue_s:.0f} s (HYDRA_MAX_QUEUE_S): "
                                "no capacity could be placed for it; retry later"}
    session.commit()
    return len(expired)


def fail_queued(session: Session, function_version_id: int, error: dict) -> int:
    """Fails the version's queued invocations with ``error``; commits, returns how many."""
    rows = session.scalars(select(Invocation).where(
        Invocation.function_version_id == function_version_id, Invocation.status == "queued")
        .with_for_update(skip_locked=True)).all()
    for inv in rows:
        inv.status, inv.finished_at, inv.error = "failed", utcnow(), error
    session.commit()
    return len(rows)


def requeue_orphans(session: Session) -> int:
    """Running invocations whose group is gone go back to queued (their message is back on
    the queue already, since it was never acked); returns how many."""
    dead = select(Instance.id).where(Instance.status.in_(CLOSED))
    running = session.scalars(select(Invocation).where(Invocation.status == "running")
                              .with_for_update(skip_locked=True)).all()
    dead_ids = set(session.scalars(dead.where(Instance.id.in_(
        {i.instance_ids[0] for i in running if i.instance_ids}))))
    orphans = [inv for inv in running if inv.instance_ids and inv.instance_ids[0] in dead_ids]
    for inv in orphans:
        inv.status = "queued"
    session.commit()
    return len(orphans)


def fail_unfinished(session: Session, reason: str) -> int:
    """Every queued or running invocation fails with ``reason`` (a service_unavailable error);
    commits and returns how many. For a local cluster that starts over a dead one's rows."""
    rows = session.scalars(select(Invocation).where(Invocation.status.in_(("queued", "running")))
                           .with_for_update(skip_locked=True)).all()
    for inv in rows:
        inv.status, inv.finished_at = "failed", utcnow()
        inv.error = {"type": "service_unavailable", "param": None, "message": reason}
    session.commit()
    return len(rows)
