"""The scheduler's view of the cluster, read from Postgres into the planner's types."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from hydraserve.cluster.models import LIVE, Device, Instance, Node, Plan
from hydraserve.db import utcnow
from hydraserve.scheduler.network import Link, Reservation
from hydraserve.scheduler.planner import Device as PlannerDevice
from hydraserve.scheduler.planner import NodeState

UNCAPPED_BYTES_PER_S = 1.25e9  # the first guess for a node without an emulated cap: 10 Gb/s


def link_of(node: Node, fetches: list[Reservation]) -> Link:
    """The node's link as the planner sees it: what its last fetches of 8 MiB or more achieved
    (the node agent reports their rate in each heartbeat, ``info.link_bandwidth_mb_per_s``),
    never above its emulated cap; before any such fetch, the cap, or the first guess for an
    uncapped node."""
    cap = node.link_mbps * 125_000 if node.link_mbps else None
    measured = (node.info or {}).get("link_bandwidth_mb_per_s")
    bps = measured * 1e6 if isinstance(measured, int | float) and measured > 0 else None
    if bps is None:
        bps = cap or UNCAPPED_BYTES_PER_S
    return Link(min(bps, cap) if cap else bps, tuple(fetches))


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
    starting = [i for i in live if i.status == "starting"]
    fetches = active_fetches(session, starting)
    plans_since_heartbeat = unseen_fetches(session, starting, list(nodes))
    out = []
    for node in nodes:
        devs = tuple(PlannerDevice(d.id, d.memory_bytes - used[d.id], workers[d.id])
                     for d in devices if d.node_id == node.id)
        cached = frozenset(tuple(c) for c in (node.info or {}).get("cached_stages", []))
        out.append(NodeState(node.id, link_of(node, fetches[node.id]), devs, cached,
                             cache_room(node, plans_since_heartbeat[node.id])))
    return out


HEARTBEAT_SLACK = timedelta(seconds=1)


def cache_room(node: Node, unseen_bytes: int) -> int | None:
    """The room its last heartbeat reported in the node cache (``info.cache_room``), less the
    fetches planned onto it since, which the heartbeat may not have seen reserve theirs."""
    room = (node.info or {}).get("cache_room")
    if not isinstance(room, int):
        return None
    return room - unseen_bytes


def unseen_fetches(session: Session, starting: list[Instance],
                   nodes: list[Node]) -> dict[str, int]:
    """Bytes of the fetches of starting stages planned on each node after (or just before)
    its last heartbeat."""
    beats = {n.id: n.last_heartbeat_at for n in nodes}
    out: dict[str, int] = defaultdict(int)
    plans = {p.id: p for p in session.scalars(select(Plan).where(
        Plan.id.in_({i.plan_id for i in starting if i.plan_id})))}
    for inst in starting:
        plan = plans.get(inst.plan_id) if inst.plan_id is not None else None
        beat = beats.get(inst.node_id)
        if plan is None or beat is None or inst.created_at < beat - HEARTBEAT_SLACK:
            continue
        out[inst.node_id] += int(plan.stages[inst.stage_index].get("fetch_bytes") or 0)
    return out


def active_fetches(session: Session, starting: list[Instance]) -> dict[str, list[Reservation]]:
    """Fetches still on each node's link: a starting stage counts with all its bytes until it is
    ready (the node agent does not report progress yet), against its plan's deadline."""
    now = utcnow()
    out: dict[str, list[Reservation]] = defaultdict(list)
    plans = {p.id: p for p in session.scalars(select(Plan).where(
        Plan.id.in_({i.plan_id for i in starting if i.plan_id})))}
    for inst in starting:
        plan = plans.get(inst.plan_id) if inst.plan_id is not None else None
        if plan is None:
            continue
        stage = plan.stages[inst.stage_index]
        if not stage.get("fetch_bytes"):
            continue
        age = (now - inst.created_at).total_seconds()
        out[inst.node_id].append(Reservation(stage["fetch_bytes"],
                                             max(stage.get("deadline_s", 0) - age, 1e-3)))
    return out


def failed_start_nodes(session: Session, function_version_id: int, within_s: float) -> set[str]:
    """Nodes where a start of the version failed before it was ready, in the last
    ``within_s`` seconds (its cache pool full, its store reads failing, ...)."""
    since = utcnow() - timedelta(seconds=within_s)
    return set(session.scalars(select(Instance.node_id).where(
        Instance.function_version_id == function_version_id, Instance.status == "failed",
        Instance.ready_at.is_(None), Instance.released_at >= since)))
