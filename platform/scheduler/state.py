"""The scheduler's view of the cluster, read from Postgres into the planner's types."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hydraserve.db.base import utcnow
from hydraserve.db.cluster import Device, Instance, Node, Plan
from hydraserve.db.serving import Invocation
from hydraserve.scheduler.network import Link, Reservation
from hydraserve.scheduler.planner import Device as PlannerDevice
from hydraserve.scheduler.planner import NodeState

LIVE = ("starting", "ready", "stopping")
UNCAPPED_BYTES_PER_S = 1.25e9  # a node without an emulated cap: assume a 10 Gb/s link


@dataclass(frozen=True, slots=True)
class Demand:
    function_version_id: int
    queued: int
    oldest_queued_at: datetime


def demand(session: Session, function_ids: set[int] | None = None) -> list[Demand]:
    """Queued requests per function version (of ``function_ids`` only, when given)."""
    q = (select(Invocation.function_version_id, func.count(), func.min(Invocation.queued_at))
         .where(Invocation.status == "queued").group_by(Invocation.function_version_id))
    if function_ids is not None:
        q = q.where(Invocation.function_id.in_(function_ids))
    return [Demand(*row) for row in session.execute(q)]


def link_of(node: Node, fetches: list[Reservation]) -> Link:
    bps = node.link_mbps * 125_000 if node.link_mbps else UNCAPPED_BYTES_PER_S
    return Link(bps, tuple(fetches))


def nodes_snapshot(session: Session) -> list[NodeState]:
    nodes = session.scalars(select(Node).where(Node.status == "up")).all()
    devices = session.scalars(select(Device)).all()
    live = session.scalars(select(Instance).where(Instance.status.in_(LIVE))).all()
    used: dict[int, int] = defaultdict(int)
    workers: dict[int, int] = defaultdict(int)
    for inst in live:
        if inst.device_id is not None:
            used[inst.device_id] += inst.memory_bytes
            workers[inst.device_id] += 1
    fetches = active_fetches(session, [i for i in live if i.status == "starting"])
    out = []
    for node in nodes:
        devs = tuple(PlannerDevice(d.id, d.memory_bytes - used[d.id], workers[d.id])
                     for d in devices if d.node_id == node.id)
        cached = frozenset(tuple(c) for c in (node.info or {}).get("cached_stages", []))
        out.append(NodeState(node.id, link_of(node, fetches[node.id]), devs, cached))
    return out


def active_fetches(session: Session, starting: list[Instance]) -> dict[str, list[Reservation]]:
    """Fetches still on each node's link: a starting stage counts with all its bytes until it is
    ready (the node agent does not report progress yet), against its plan's deadline."""
    now = utcnow()
    out: dict[str, list[Reservation]] = defaultdict(list)
    plans = {p.id: p for p in session.scalars(select(Plan).where(
        Plan.id.in_({i.plan_id for i in starting if i.plan_id})))}
    for inst in starting:
        plan = plans.get(inst.plan_id)
        if plan is None:
            continue
        stage = plan.stages[inst.stage_index]
        if not stage.get("fetch_bytes"):
            continue
        age = (now - inst.created_at).total_seconds()
        out[inst.node_id].append(Reservation(stage["fetch_bytes"],
                                             max(stage.get("deadline_s", 0) - age, 1e-3)))
    return out


def groups(session: Session, function_version_id: int | None = None) -> dict[int, list[Instance]]:
    """Live pipeline groups by plan id, each a list of instances by stage."""
    q = select(Instance).where(Instance.status.in_(LIVE)).order_by(Instance.stage_index)
    if function_version_id is not None:
        q = q.where(Instance.function_version_id == function_version_id)
    out: dict[int, list[Instance]] = defaultdict(list)
    for inst in session.scalars(q):
        out[inst.plan_id or -inst.id].append(inst)
    return out
