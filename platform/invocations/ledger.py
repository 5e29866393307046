"""The request ledger: what stage 0 of a serving group writes per request (claim, record,
fail, cancel check, activity). Every write commits at once, since a worker may die.

The per-request writes (``begin``, ``complete``, ``fail``, ``cancelled``, ``touch``) are single
statements on a Core connection, meant to run in autocommit (see ``Ledger``): one round trip
each on the warm path, whatever the batch size."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import (
    DateTime,
    Float,
    Integer,
    String,
    bindparam,
    case,
    cast,
    column,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from hydraserve.cluster.models import Instance, Plan
from hydraserve.db import NulSafeJSONB, utcnow
from hydraserve.invocations.models import FINISHED, Invocation
from hydraserve.tenants.limits import count_tokens

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # deliveries of one invocation before it is failed for good
T = TypeVar("T")


class Ledger:
    """A worker's kept autocommit connection for the per-request writes: no BEGIN, no pre-ping,
    no pool checkout per call. A statement that fails because the connection broke (Postgres
    restarted) is retried on a new connection, every ``RETRY_S`` until ``OUTAGE_S`` have passed
    (a restart takes seconds; the worker waits it out instead of dying with its requests);
    claiming twice only spends an attempt."""

    RETRY_S, OUTAGE_S = 0.5, 60.0

    def __init__(self, engine: Engine, clock=time.monotonic, sleep=time.sleep) -> None:
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._conn: Connection | None = None
        self.clock, self.sleep = clock, sleep

    def run(self, write: Callable[..., T], *args) -> T:
        give_up = self.clock() + self.OUTAGE_S
        while True:
            try:
                if self._conn is None:
                    self._conn = self.engine.connect()
                return write(self._conn, *args)
            except DBAPIError as exc:
                broken = exc.connection_invalidated or isinstance(exc, OperationalError)
                if not broken or self.clock() >= give_up:
                    raise
                self.close()
                log.warning("database connection lost (%s); retrying in %.1f s",
                            type(exc.orig).__name__, self.RETRY_S)
                self.sleep(self.RETRY_S)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


INVOCATION_FIELDS = ("id", "tenant_id", "function_version_id", "status", "cold", "output",
                     "error", "tokens_in", "tokens_out",
                     "attempts", "instance_ids", "queued_at", "planned_at", "fetched_at",
                     "loaded_at", "first_token_at", "finished_at")
GAVE_UP = {"type": "service_unavailable", "param": None,
           "message": f"gave up after {MAX_ATTEMPTS} attempts: the workers serving it stopped "
                      "before it finished"}


def _claim_statement():
    spent = Invocation.attempts >= MAX_ATTEMPTS  # this delivery would be one too many
    return (update(Invocation)
            .where(Invocation.id.in_(bindparam("ids", expanding=True)),
                   Invocation.status.not_in(FINISHED))
            .values(attempts=Invocation.attempts + 1,
                    status=case((spent, "failed"), else_="running"),
                    finished_at=case((spent, bindparam("now")), else_=Invocation.finished_at),
                    error=case((spent, cast(GAVE_UP, JSONB)), else_=Invocation.error),
                    instance_ids=case((spent, Invocation.instance_ids),
                                      else_=cast(bindparam("group", type_=JSONB), JSONB)),
                    cold=Invocation.queued_at < bindparam("ready_at"))
            .returning(Invocation.id, Invocation.status, Invocation.cold,
                       Invocation.worker_deaths))


def _record_statement():
    # the rows go in as NulSafeJSONB: a generated NUL is stored escaped, and RETURNING reads it
    # back through the column's type, unescaped
    done = func.jsonb_to_recordset(bindparam("rows", type_=NulSafeJSONB)).table_valued(
        column("id", String), column("output", JSONB), column("tokens_in", Integer),
        column("tokens_out", Integer), column("first_token_at", DateTime(timezone=True)),
        column("finished_at", DateTime(timezone=True))).render_derived("done", with_types=True)
    return (update(Invocation)
            .where(Invocation.id == done.c.id, Invocation.status.not_in(FINISHED))
            .values(status="succeeded", output=done.c.output, tokens_in=done.c.tokens_in,
                    tokens_out=done.c.tokens_out, first_token_at=done.c.first_token_at,
                    finished_at=done.c.finished_at,
                    fetched_at=func.coalesce(Invocation.fetched_at, case(
                        (Invocation.cold.is_(True), _group_fetch_end()), else_=None)))
            .returning(*(getattr(Invocation, f) for f in INVOCATION_FIELDS)))


def _group_fetch_end():
    """When the last stage of the invocation's group had its bytes (the latest ``fetch_end``
    in the group's instance timelines), for a cold invocation claimed before its node agents
    had written them: stage 0 may start serving a moment before the agent's timeline write
    commits, so the claim can miss the fetch phase; the record, later, fills it in."""
    group_ids = select(cast(func.jsonb_array_elements_text(Invocation.instance_ids), Integer)
                       ).correlate(Invocation)
    fetch_end = func.max(Instance.timeline["fetch_end"].astext.cast(Float))
    return (select(func.to_timestamp(fetch_end)).where(Instance.id.in_(group_ids))
            .correlate(Invocation).scalar_subquery())


# Built once: building a statement with CASEs or a table function costs about 1 ms of CPU,
# more than running it, and these two run for every request.
CLAIM, RECORD = _claim_statement(), _record_statement()


def begin(conn: Connection, inv_ids: list[str], group: tuple[int, ...],
          ready_at: datetime) -> dict[str, int]:
    """Claims invocations for this group; returns the ids to run, each with the number of
    worker deaths it is a suspect of (invocations/quarantine.py). Skipped: those already
    finished (a redelivery) and those out of attempts (failed here, with why). One statement on
    the warm path; the cold-start timestamps are written only for cold requests."""
    rows = conn.execute(CLAIM, {"ids": inv_ids, "now": utcnow(), "group": list(group),
                                "ready_at": ready_at}).all()
    claimed = {r.id: r.worker_deaths for r in rows if r.status == "running"}
    cold = [r.id for r in rows if r.status == "running" and r.cold]
    if cold:
        planned_at, fetched_at = cold_start_times(conn, group)
        conn.execute(update(Invocation).where(Invocation.id.in_(cold)).values(
            planned_at=planned_at, fetched_at=fetched_at, loaded_at=ready_at))
    return claimed


def cold_start_times(conn: Connection, group: tuple[int, ...]) -> tuple[datetime | None,
                                                                      datetime | None]:
    """When the group's plan was made, and when its last stage's bytes had arrived."""
    planned_at = conn.scalar(select(Plan.created_at).join(Instance, Instance.plan_id == Plan.id)
                             .where(Instance.id == group[0]))
    fetch_ends = [t for tl in conn.scalars(select(Instance.timeline).where(Instance.id.in_(group)))
                  if (t := (tl or {}).get("fetch_end"))]
    return planned_at, _at(max(fetch_ends, default=None))


def _at(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=UTC) if value else None


@dataclass(frozen=True, slots=True)
class Outcome:
    inv_id: str
    output: dict
    tokens_in: int
    tokens_out: int
    first_token_at: datetime | None


def complete(conn: Connection, outcomes: list[Outcome]) -> dict[str, dict]:
    """Records finished invocations in one statement, whatever their number (a cancel that came
    first is kept), and their tokens in each tenant's per-minute usage. Returns the recorded
    rows by id, as the API shows them."""
    now = utcnow().isoformat()
    rows = [{"id": o.inv_id, "output": o.output, "tokens_in": o.tokens_in,
             "tokens_out": o.tokens_out, "finished_at": now,
             "first_token_at": o.first_token_at.isoformat() if o.first_token_at else None}
            for o in outcomes]
    recorded = {r.id: r._asdict() for r in conn.execute(RECORD, {"rows": rows})}
    tokens: dict[int, int] = defaultdict(int)
    for r in recorded.values():
        tokens[r["tenant_id"]] += (r["tokens_in"] or 0) + (r["tokens_out"] or 0)
    count_tokens(conn, tokens)
    return recorded


def fail(conn: Connection, inv_id: str, kind: str, message: str, param: str | None) -> None:
    conn.execute(update(Invocation)
                 .where(Invocation.id == inv_id, Invocation.status.not_in(FINISHED))
                 .values(status="failed", finished_at=utcnow(),
                         error={"type": kind, "message": message, "param": param}))


def cancelled(conn: Connection, inv_ids: list[str]) -> set[str]:
    if not inv_ids:
        return set()
    return set(conn.scalars(select(Invocation.id).where(Invocation.id.in_(inv_ids),
                                                        Invocation.status == "cancelled")))


def touch(conn: Connection, group: tuple[int, ...]) -> None:
    conn.execute(update(Instance).where(Instance.id.in_(group)).values(last_active_at=utcnow()))
