"""Cluster use cases: nodes and their devices, and the life cycle of the instances they run
(recorded plan and group, readiness, activity, exits, silent nodes), Postgres side."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import cast, func, select, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.orm import Session

from hydraserve.billing.service import close_usage, open_usage
from hydraserve.cluster.models import CLOSED, ERROR_CHARS, LIVE, Device, Instance, Node, Plan
from hydraserve.db import must_get, notify, utcnow
from hydraserve.functions.models import Function, FunctionVersion

# A stage's activation channel listens on PORT_BASE + instance id mod PORT_SPAN, chosen when the
# plan is recorded, so every stage knows its peers before any process starts.
PORT_BASE, PORT_SPAN = 31000, 20000


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    index: int
    kind: str
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class StageRecord:
    """One stage of a plan to record: where it runs and the memory it holds."""

    stage: int
    node_id: str
    device_id: int
    memory_bytes: int
    full_share: bool
    fetch_bytes: int
    deadline_s: float  # how long its fetch may hold the node's link


# ---- nodes ---------------------------------------------------------------------------------

def register(session: Session, node_id: str, address: str, link_mbps: float | None,
             devices: list[DeviceSpec], info: dict) -> None:
    """Upserts the node and its devices and marks it up; instances it ran before a restart
    are gone, so they are closed."""
    now = utcnow()
    session.execute(insert(Node).values(
        id=node_id, address=address, link_mbps=link_mbps, status="up", last_heartbeat_at=now,
        registered_at=now, info=info).on_conflict_do_update(
        index_elements=["id"], set_={"address": address, "link_mbps": link_mbps, "status": "up",
                                     "last_heartbeat_at": now, "info": info}))
    for d in devices:
        session.execute(insert(Device).values(
            node_id=node_id, index=d.index, kind=d.kind, memory_bytes=d.memory_bytes)
            .on_conflict_do_update(constraint="uq_devices_node_id",
                                   set_={"kind": d.kind, "memory_bytes": d.memory_bytes}))
    stale = session.scalars(select(Instance.id).where(Instance.node_id == node_id,
                                                      Instance.status.in_(LIVE))).all()
    for instance_id in stale:
        close_instance(session, instance_id, "failed", "node agent restarted")
    notify(session, f"node:{node_id}")
    session.commit()


def retire_all_nodes(session: Session, reason: str) -> list[str]:
    """Every node goes down and every live instance fails with ``reason``; commits. For a
    local cluster that starts where a dead one of the same checkout left its rows."""
    nodes = list(session.scalars(select(Node.id).where(Node.status != "down").order_by(Node.id)))
    session.execute(update(Node).values(status="down"))
    for instance_id in session.scalars(select(Instance.id).where(Instance.status.in_(LIVE))).all():
        close_instance(session, instance_id, "failed", reason)
    session.commit()
    return nodes


def heartbeat(session: Session, node_id: str, info: dict) -> None:
    session.execute(update(Node).where(Node.id == node_id)
                    .values(last_heartbeat_at=utcnow(), status="up", info=info))
    session.commit()


def mark_silent_nodes_down(session: Session, timeout_s: float) -> list[str]:
    """Nodes whose last heartbeat is older than ``timeout_s`` go down, and their live
    instances fail with the reason; returns their ids."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    silent = session.scalars(select(Node).where(Node.status == "up",
                                                Node.last_heartbeat_at < cutoff)).all()
    for node in silent:
        node.status = "down"
        lost = session.scalars(select(Instance.id).where(Instance.node_id == node.id,
                                                         Instance.status.in_(LIVE)))
        for instance_id in lost.all():
            close_instance(session, instance_id, "failed", f"node {node.id} stopped heartbeating")
    session.commit()
    return [n.id for n in silent]


# ---- groups (the instances of one plan) ----------------------------------------------------

def record_group(session: Session, fv: FunctionVersion, pp: int, stages: Sequence[StageRecord],
                 reason: str, predicted_ttft_s: float, predicted_tpot_s: float,
                 policy: str = "hydra",
                 consolidation: tuple[int | None, str] = (None, "")) -> list[Instance]:
    """Records a plan (with its consolidation target and why, cluster/consolidation.py), one
    starting instance per stage (with its channel address) and one open usage record per
    instance, and commits; returns the instances by stage."""
    target, why = consolidation
    row = Plan(function_version_id=fv.id, pp=pp, status="started", reason=reason, policy=policy,
               consolidation_target=target, consolidation_reason=(why or None) if pp > 1 else None,
               predicted_ttft_ms=predicted_ttft_s * 1000,
               predicted_tpot_ms=predicted_tpot_s * 1000,
               stages=[{"stage": s.stage, "node_id": s.node_id, "device_id": s.device_id,
                        "memory_bytes": s.memory_bytes, "full_share": s.full_share,
                        "fetch_bytes": s.fetch_bytes, "deadline_s": s.deadline_s}
                       for s in stages])
    session.add(row)
    session.flush()
    fn = must_get(session, Function, fv.function_id)
    instances = [Instance(function_version_id=fv.id, plan_id=row.id, node_id=s.node_id,
                          device_id=s.device_id, stage_index=s.stage, num_stages=pp,
                          memory_bytes=s.memory_bytes, status="starting") for s in stages]
    session.add_all(instances)
    session.flush()
    for inst in instances:
        node, device = must_get(session, Node, inst.node_id), must_get(session, Device, inst.device_id)
        inst.address = f"tcp://{node.address or '127.0.0.1'}:{PORT_BASE + inst.id % PORT_SPAN}"
        open_usage(session, inst, fn, device.kind)
    session.commit()
    return instances


def live_groups(session: Session,
                function_version_id: int | None = None) -> dict[int, list[Instance]]:
    """Live pipeline groups by plan id, each a list of instances by stage."""
    q = select(Instance).where(Instance.status.in_(LIVE)).order_by(Instance.stage_index)
    if function_version_id is not None:
        q = q.where(Instance.function_version_id == function_version_id)
    out: dict[int, list[Instance]] = defaultdict(list)
    for inst in session.scalars(q):
        out[inst.plan_id or -inst.id].append(inst)
    return out


def mark_stopping(session: Session, group: list[Instance]) -> None:
    """The group's starting and ready instances become ``stopping``; flushed (their rows stay
    locked until the caller commits), not committed."""
    for inst in group:
        if inst.status in ("starting", "ready"):
            inst.status = "stopping"
    session.flush()


def mark_ready(session: Session, group: tuple[int, ...], timeline: dict) -> datetime:
    """Marks the group ready now; returns that time (the worker's cold/warm line)."""
    now = utcnow()
    session.execute(update(Instance).where(Instance.id.in_(group), Instance.status == "starting")
                    .values(status="ready", ready_at=now, last_active_at=now))
    add_timeline(session, group[0], timeline)
    notify(session, f"ready:{group[0]}")
    session.commit()
    return now


# ---- instances -----------------------------------------------------------------------------

def close_instance(session: Session, instance_id: int, status: str, error: str | None = None) -> None:
    """Ends an instance (released or failed) and its usage record; no commit."""
    assert status in CLOSED, f"close_instance to {status!r}; allowed {CLOSED}"
    inst = session.get(Instance, instance_id)
    if inst is None or inst.status in CLOSED:
        return
    now = utcnow()
    inst.status, inst.released_at = status, now
    if error:
        inst.error = error[:ERROR_CHARS]
    close_usage(session, instance_id, now)
    notify(session, f"closed:{instance_id}")


def fail_instance(session: Session, instance_id: int, error: str) -> None:
    """Closes an instance as failed with its cause, and commits."""
    close_instance(session, instance_id, "failed", error)
    session.commit()


def fail_start(session: Session, instance_id: int, error: str) -> None:
    """Closes an instance whose start failed on its node (the worker could not load or exited
    before it was ready) as failed, marked ``start_failed`` in its timeline: the failures the
    scheduler backs off from and, repeated, marks a version unservable for (a node that dies
    is not the model's fault, and is not marked). No commit."""
    inst = session.get(Instance, instance_id)
    if inst is None or inst.status in CLOSED:
        return
    close_instance(session, instance_id, "failed", inst.error or error)  # the worker's own first
    add_timeline(session, instance_id, {"start_failed": utcnow().timestamp()})


@dataclass(frozen=True, slots=True)
class StartFailures:
    count: int
    last_at: datetime | None
    last_error: str | None


def start_failures(session: Session, fv: FunctionVersion) -> StartFailures:
    """The version's failed starts (plans whose instances failed before they were ready) since
    it last had an instance ready (or an admin cleared them), with the latest one's time and
    cause."""
    since = session.scalar(select(func.max(Instance.ready_at)).where(
        Instance.function_version_id == fv.id))
    if fv.starts_cleared_at is not None and (since is None or fv.starts_cleared_at > since):
        since = fv.starts_cleared_at
    q = select(Instance.plan_id, Instance.released_at, Instance.error).where(
        Instance.function_version_id == fv.id, Instance.status == "failed",
        Instance.timeline.has_key("start_failed"))
    if since is not None:
        q = q.where(Instance.released_at > since)
    rows = session.execute(q.order_by(Instance.released_at.desc())).all()
    starts = {r.plan_id for r in rows}  # a pipeline's stages failing together are one start
    return StartFailures(len(starts), rows[0].released_at if rows else None,
                         rows[0].error if rows else None)


def instance_exited(session: Session, instance_id: int, returncode: int) -> str | None:
    """Closes the instance of a worker that exited: released when it was being stopped, else
    failed. Commits; returns the failure's recorded cause (None when released)."""
    inst = session.get(Instance, instance_id)
    if inst is None:
        return None
    clean, starting = inst.status == "stopping", inst.status == "starting"
    error = None if clean else f"worker process exited with code {returncode}"
    if starting:
        fail_start(session, instance_id, error or "")
    else:
        close_instance(session, instance_id, "released" if clean else "failed", error)
    cause = None if clean else inst.error or f"worker process exited with code {returncode}"
    session.commit()
    return cause


def closed_instances(session: Session, instance_ids: list[int]) -> list[int]:
    """Those of ``instance_ids`` that are failed or released in Postgres."""
    rows = session.scalars(select(Instance.id).where(
        Instance.id.in_(instance_ids), Instance.status.in_(CLOSED))).all()
    session.commit()
    return list(rows)


def instance_status(session: Session, instance_id: int) -> str:
    status = session.scalar(select(Instance.status).where(Instance.id == instance_id))
    session.commit()
    return status or "released"


def set_pid(session: Session, instance_id: int, pid: int) -> None:
    session.execute(update(Instance).where(Instance.id == instance_id).values(pid=pid))
    session.commit()


def add_timeline(session: Session, instance_id: int, phases: dict[str, Any]) -> None:
    """Merges phase timestamps into an instance's timeline (one atomic jsonb update: the node
    agent and the worker both write theirs); no commit."""
    session.execute(update(Instance).where(Instance.id == instance_id).values(
        timeline=Instance.timeline.op("||")(cast(phases, JSONB))))


def stage_holder(session: Session, instance_id: int,
                 exclude: str) -> tuple[str, str, int] | None:
    """(node id, address, peer port) of the node where a live stage of a group runs: its cache
    holds that stage complete (the worker loaded it from there and keeps it mapped); None if
    the stage is gone, on ``exclude`` or on a node that serves no peers."""
    row = session.execute(select(Node).join(Instance, Instance.node_id == Node.id).where(
        Instance.id == instance_id, Instance.status == "ready", Node.status == "up")).scalar()
    session.commit()
    port = (row.info or {}).get("peer_port") if row is not None else None
    if row is None or row.id == exclude or not port:
        return None
    return row.id, row.address or "127.0.0.1", int(port)


def cache_peers(session: Session, model_id: int, pp: int, stage: int,
                exclude: str) -> list[tuple[str, str, int]]:
    """(node id, address, peer port) of the up nodes whose heartbeat reports stage ``stage`` of
    ``model_id``'s ``pp``-stage split complete in their cache and serve it to peers, other
    than ``exclude``."""
    nodes = session.scalars(select(Node).where(Node.status == "up")).all()
    out = [(n.id, n.address or "127.0.0.1", int(n.info["peer_port"])) for n in nodes
           if n.id != exclude and (n.info or {}).get("peer_port")
           and [model_id, pp, stage] in (n.info or {}).get("cached_stages", [])]
    session.commit()
    return out


def plan_of_instance(session: Session, instance_id: int | None) -> Plan | None:
    """The plan of an instance's group (None for no instance)."""
    if instance_id is None:
        return None
    return session.scalar(select(Plan).join(Instance, Instance.plan_id == Plan.id)
                          .where(Instance.id == instance_id))


def instances_with_plans(session: Session, live_only: bool, limit: int
                         ) -> list[tuple[Instance, FunctionVersion, Plan | None, Device | None]]:
    """Instances, newest first (the live ones, or every one), with their version, plan and
    device."""
    q = select(Instance, FunctionVersion, Plan, Device).join(
        FunctionVersion, FunctionVersion.id == Instance.function_version_id).outerjoin(
        Plan, Plan.id == Instance.plan_id).outerjoin(
        Device, Device.id == Instance.device_id).order_by(Instance.id.desc()).limit(limit)
    if live_only:
        q = q.where(Instance.status.in_(LIVE))
    return [(i, fv, plan, device) for i, fv, plan, device in session.execute(q)]


def instances_by_status(session: Session) -> dict[str, int]:
    """How many instances are in each status (the live ones and those closed so far)."""
    rows = session.execute(select(Instance.status, func.count()).group_by(Instance.status))
    return {status: n for status, n in rows}
