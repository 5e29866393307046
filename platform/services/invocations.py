"""Invocations: accept (row + durable message), read, cancel, and wait for the outcome."""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from pika.exceptions import AMQPError
from sqlalchemy import bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session

from hydraserve.db.base import utcnow
from hydraserve.db.serving import Invocation
from hydraserve.errors import NotFound, ServiceUnavailable
from hydraserve.messaging import Publisher, ReplyListener, request_queue
from hydraserve.schemas import InvokeRequest
from hydraserve.services.functions import Target
from hydraserve.services.tenants import Principal

FINISHED = ("succeeded", "failed", "cancelled")
ACCEPTED = ("id", "tenant_id", "function_id", "function_version_id", "status", "attempts",
            "request", "instance_ids", "queued_at")  # the columns a new invocation is written with
EVENTS_CHANNEL = "hydra_events"  # Postgres NOTIFY channel the scheduler listens on
DB_POLL_S = 1.0


def new_id() -> str:
    return "inv_" + uuid.uuid4().hex


def notify(session: Session, what: str) -> None:
    session.execute(text("SELECT pg_notify(:c, :p)"), {"c": EVENTS_CHANNEL, "p": what})


def _accept_statement():
    """INSERT the row and NOTIFY the scheduler, one statement; built once (every request)."""
    columns = Invocation.__table__.c
    row = insert(Invocation).values({c: bindparam(c, type_=columns[c].type) for c in ACCEPTED})
    return select(func.pg_notify(EVENTS_CHANNEL, bindparam("event"))).select_from(
        row.returning(Invocation.function_id).cte("accepted"))


ACCEPT = _accept_statement()


def accept(session: Session, publisher: Publisher, who: Principal, target: Target,
           body: InvokeRequest, kind: str, inv_id: str, reply_to: str | None,
           prefix: str = "", stream: bool = False) -> Invocation:
    """Stores the invocation, then publishes it; if the broker refuses, the row records why.
    Subscribe to ``inv_id``'s replies before calling this, so no event is missed. With
    ``stream`` the worker sends every token; without, only the final ``done``/``error``.

    The row is written by one statement that also notifies the scheduler, run on the session's
    Core connection (no ORM execution context, ~50 us less per statement), and the returned
    Invocation is not attached to the session (this runs on every request)."""
    inv = Invocation(id=inv_id, tenant_id=who.tenant_id, function_id=target.function_id,
                     function_version_id=target.version_id, status="queued", attempts=0,
                     request={"kind": kind, **body.model_dump(exclude_none=True)},
                     instance_ids=[], queued_at=utcnow())
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


@dataclass(slots=True)
class Waiter:
    """Follows one invocation: token events from the reply queue, Postgres as the fallback.
    Uses a short-lived session per look, so it outlives the request's own session (SSE).
    The worker's ``done`` event carries the row it has just committed; then ``load`` needs no
    query."""

    sessions: Callable[[], Session]
    listener: ReplyListener
    inv_id: str
    events: queue.Queue
    final: Invocation | None = None

    def close(self) -> None:
        self.listener.unsubscribe(self.inv_id)

    def load(self) -> Invocation:
        if self.final is not None:
            return self.final
        with self.sessions() as s:
            inv = s.get(Invocation, self.inv_id)
            s.expunge(inv)
            return inv

    def cancel(self) -> None:
        with self.sessions() as s:
            cancel(s, s.get(Invocation, self.inv_id))

    def follow(self, deadline_s: float, tick_s: float = 1.0) -> Iterator[dict | None]:
        """Yields token events as they come and ``None`` every ``tick_s`` of silence (SSE
        keep-alive); ends after the ``done``/``error`` event, or when the row is finished, or at
        the deadline."""
        end = time.monotonic() + deadline_s
        last_poll = time.monotonic()
        while time.monotonic() < end:
            try:
                event = self.events.get(timeout=min(tick_s, max(end - time.monotonic(), 0.01)))
            except queue.Empty:
                event = None
            if event is not None:
                if "invocation" in event:
                    self.final = detached(event.pop("invocation"))
                yield event
                if event["type"] in ("done", "error"):
                    return
                continue
            if time.monotonic() - last_poll >= DB_POLL_S:
                last_poll = time.monotonic()
                if self.load().status in FINISHED:
                    return
            yield None


def detached(row: dict) -> Invocation:
    """An Invocation from a ``done`` event's row (ISO timestamps), bound to no session."""
    times = {k: datetime.fromisoformat(v) for k, v in row.items() if k.endswith("_at") and v}
    return Invocation(**(row | times))
