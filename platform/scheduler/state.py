"""The scheduler's view of the cluster, read from Postgres into the planner's types."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from hydraserve.cluster.consolidation import replica_stages
from hydraserve.cluster.models import LIVE, Device, Instance, Node, Plan
from hydraserve.db import utcnow
from hydraserve.functions.models import FunctionVersion, Model
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
    plans = {p.id: p for p in session.scalars(select(Plan).where(
        Plan.id.in_({i.plan_id for i in starting if i.plan_id})))}
    fetches = active_fetches(starting, plans)
    for node_id, rest in background_fetches(session, live).items():
        fetches[node_id].extend(rest)
    unseen = unseen_stages(starting, plans, list(nodes))
    out = []
    for node in nodes:
        devs = tuple(PlannerDevice(d.id, d.memory_bytes - used[d.id], workers[d.id])
                     for d in devices if d.node_id == node.id)
        cached = frozenset(tuple(c) for c in (node.info or {}).get("cached_stages", []))
        out.append(NodeState(node.id, link_of(node, fetches[node.id]), devs, cached,
                             cache_room(node, unseen[node.id].fetch_bytes),
                             boot_wait_s(node, unseen[node.id].stages)))
    return out


HEARTBEAT_SLACK = timedelta(seconds=1)


@dataclass(slots=True)
class Unseen:
    """Stages planned on a node after (or just before) its last heartbeat: what that heartbeat
    may not have counted yet."""

    stages: int = 0
    fetch_bytes: int = 0


def cache_room(node: Node, unseen_bytes: int) -> int | None:
    """The room its last heartbeat reported in the node cache (``info.cache_room``), less the
    fetches planned onto it since, which the heartbeat may not have seen reserve theirs."""
    room = (node.info or {}).get("cache_room")
    if not isinstance(room, int):
        return None
    return room - unseen_bytes


def boot_wait_s(node: Node, unseen_stages: int) -> float:
    """What a stage placed on the node now waits for a worker: nothing while its last heartbeat
    reported more booted idle workers (``info.idle_workers``) than stages planned there since,
    else as long as its latest worker boot took (``info.boot_s``). A node that reports no boot
    (no worker pool: a fresh process per start) waits alike for every plan: 0 here."""
    info = node.info or {}
    boot, idle = info.get("boot_s"), info.get("idle_workers")
    if not isinstance(boot, int | float) or not isinstance(idle, int) or idle > unseen_stages:
        return 0.0
    return float(boot)


def unseen_stages(starting: list[Instance], plans: dict[int, Plan],
                  nodes: list[Node]) -> dict[str, Unseen]:
    """Per node, the starting stages planned there after (or just before) its last heartbeat."""
    beats = {n.id: n.last_heartbeat_at for n in nodes}
    out: dict[str, Unseen] = defaultdict(Unseen)
    for inst in starting:
        plan = plans.get(inst.plan_id) if inst.plan_id is not None else None
        beat = beats.get(inst.node_id)
        if plan is None or beat is None or inst.created_at < beat - HEARTBEAT_SLACK:
            continue
        seen = out[inst.node_id]
        seen.stages += 1
        seen.fetch_bytes += int(plan.stages[inst.stage_index].get("fetch_bytes") or 0)
    return out


def active_fetches(starting: list[Instance], plans: dict[int, Plan]) -> dict[str, list[Reservation]]:
    """Fetches still on each node's link: a starting stage counts with all its bytes until it is
    ready (the node agent does not report progress yet), against its plan's deadline."""
    now = utcnow()
    out: dict[str, list[Reservation]] = defaultdict(list)
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


def background_fetches(session: Session,
                       live: Sequence[Instance]) -> dict[str, list[Reservation]]:
    """The rest of the model on its way to each full-share stage of a consolidating group
    (stage 0, and the stages that become replicas): bytes on that node's link, at background
    priority (it yields to cold starts: no deadline), until the node records the fetch done
    (``fetch_s<stage>`` in the plan's consolidation record). Counted whole: the node may find
    a stage in its own cache, which the scheduler does not know in advance."""
    ids = {i.plan_id for i in live if i.plan_id is not None}
    rows = session.execute(select(Plan, Model.total_bytes)
                           .join(FunctionVersion, FunctionVersion.id == Plan.function_version_id)
                           .join(Model, Model.id == FunctionVersion.model_id)
                           .where(Plan.id.in_(ids), Plan.consolidation_state == "consolidating"))
    consolidating = {plan.id: (plan, model_bytes) for plan, model_bytes in rows}
    out: dict[str, list[Reservation]] = defaultdict(list)
    for inst in live:
        if inst.plan_id is None or inst.plan_id not in consolidating:
            continue
        plan, model_bytes = consolidating[inst.plan_id]
        if f"fetch_s{inst.stage_index}" in (plan.consolidation or {}):
            continue
        if inst.stage_index == 0 or inst.stage_index in replica_stages(plan.stages, model_bytes):
            rest = model_bytes - math.ceil(model_bytes / plan.pp)
            out[inst.node_id].append(Reservation(rest, math.inf))
    return out


def failed_start_nodes(session: Session, function_version_id: int, within_s: float) -> set[str]:
    """Nodes where a start of the version failed before it was ready, in the last
    ``within_s`` seconds (its cache pool full, its store reads failing, ...)."""
    since = utcnow() - timedelta(seconds=within_s)
    return set(session.scalars(select(Instance.node_id).where(
        Instance.function_version_id == function_version_id, Instance.status == "failed",
        Instance.ready_at.is_(None), Instance.released_at >= since)))
