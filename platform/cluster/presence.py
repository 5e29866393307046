"""Node presence: a node agent holds a Postgres advisory lock of its own, on a connection of
its own, for as long as its process lives. A killed agent's socket is closed by the kernel,
Postgres ends that session and frees the lock at once, so the scheduler sees a dead node
within a tick, however late the node's heartbeats are on a busy machine (a heartbeat is one
thread's database write; a lock needs nothing from the agent while it lives). Heartbeats stay
the backstop for an agent that lives but no longer works (``scheduler/loop.py``).

The node's heartbeat info names its lock (``presence_key``), so a node registered by anything
that holds no lock (an older agent, a test) is judged by its heartbeats alone.
"""

from __future__ import annotations

import logging
import threading
import zlib
from datetime import datetime

import psycopg
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from hydraserve.cluster.models import LIVE, Instance, Node
from hydraserve.cluster.service import close_instance
from hydraserve.db import utcnow

log = logging.getLogger("hydraserve.node")
# the first key of the two-key advisory lock form; the scheduler leader's single bigint key
# (objsubid 1 in pg_locks) never meets these (objsubid 2)
PRESENCE_CLASS = 0x4859  # "HY"
CHECK_S = 0.5  # how often the agent looks at its connection (to notice a Postgres restart)


def lock_key(node_id: str) -> int:
    """The second key of ``node_id``'s lock (a positive int4: pg_locks shows it as objid)."""
    return zlib.crc32(node_id.encode()) & 0x7FFFFFFF


class Presence:
    """The agent's side: a daemon thread that takes the node's lock and keeps its session,
    and takes it again on a new connection after Postgres restarts."""

    def __init__(self, database_url: str, node_id: str, check_s: float = CHECK_S) -> None:
        self.conninfo = make_url(database_url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        self.node_id, self.key, self.check_s = node_id, lock_key(node_id), check_s
        self.held = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="presence")

    def start(self, timeout_s: float = 10.0) -> Presence:
        """Starts holding; waits up to ``timeout_s`` for the lock (a previous agent of this
        node may still be ending)."""
        self._thread.start()
        if not self.held.wait(timeout_s):
            log.warning("node %s: presence lock not taken within %.0f s; the scheduler judges "
                        "this node by its heartbeats until it is", self.node_id, timeout_s)
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Ends the session (the lock goes with it); the scheduler then takes the node out."""
        self._closed.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._hold()
            except psycopg.Error as exc:
                if self.held.is_set():
                    log.warning("node %s: presence session lost (%s); reconnecting",
                                self.node_id, type(exc).__name__)
                self.held.clear()
                self._closed.wait(self.check_s)
        self.held.clear()

    def _hold(self) -> None:
        with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5,
                             application_name=f"hydraserve node {self.node_id}") as conn:
            while not conn.execute("SELECT pg_try_advisory_lock(%s, %s)",
                                   (PRESENCE_CLASS, self.key)).fetchone()[0]:  # type: ignore[index]
                if self._closed.wait(self.check_s):  # an earlier session of this node has
                    return  # not ended yet
            self.held.set()
            while not self._closed.wait(self.check_s):  # a broken connection raises here
                conn.execute("SELECT 1")


def absent_nodes(session: Session) -> dict[str, float]:
    """Up nodes that name a presence lock no session holds now: node id -> seconds since
    the node's last heartbeat. No commit."""
    held = set(session.scalars(text(
        "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND classid = :c "
        "AND objsubid = 2 AND granted AND database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database())"), {"c": PRESENCE_CLASS}))
    now = utcnow()
    rows = session.execute(select(Node.id, Node.info, Node.last_heartbeat_at)
                           .where(Node.status == "up"))
    return {node_id: _age(now, beat) for node_id, info, beat in rows
            if (key := (info or {}).get("presence_key")) is not None and key not in held}


def _age(now: datetime, then: datetime | None) -> float:
    return (now - then).total_seconds() if then is not None else float("inf")


def take_out(session: Session, node_ids: list[str]) -> None:
    """These nodes go down and their live instances fail with the reason; commits."""
    for node_id in node_ids:
        node = session.get(Node, node_id)
        if node is None or node.status != "up":
            continue
        node.status = "down"
        lost = session.scalars(select(Instance.id).where(Instance.node_id == node_id,
                                                         Instance.status.in_(LIVE)))
        for instance_id in lost.all():
            close_instance(session, instance_id, "failed",
                           f"node {node_id}'s agent is gone (its presence session ended)")
    session.commit()
