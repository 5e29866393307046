"""Nodes, their devices, and the life cycle of the instances they run (Postgres side)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from hydraserve.db.base import utcnow
from hydraserve.db.billing import UsageRecord
from hydraserve.db.cluster import Device, Instance, Node
from hydraserve.services.invocations import notify

LIVE = ("starting", "ready", "stopping")


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    index: int
    kind: str
    memory_bytes: int


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


def heartbeat(session: Session, node_id: str, info: dict) -> None:
    session.execute(update(Node).where(Node.id == node_id)
                    .values(last_heartbeat_at=utcnow(), status="up", info=info))
    session.commit()


def close_instance(session: Session, instance_id: int, status: str, error: str | None = None) -> None:
    """Ends an instance (released or failed) and its usage record; no commit."""
    inst = session.get(Instance, instance_id)
    if inst is None or inst.status in ("released", "failed"):
        return
    now = utcnow()
    inst.status, inst.released_at = status, now
    if error:
        inst.error = error[:1000]
    session.execute(update(UsageRecord).where(UsageRecord.instance_id == instance_id,
                                              UsageRecord.ended_at.is_(None))
                    .values(ended_at=now))
    notify(session, f"closed:{instance_id}")


def instance_exited(session: Session, instance_id: int, returncode: int) -> None:
    inst = session.get(Instance, instance_id)
    if inst is None:
        return
    clean = inst.status == "stopping"
    close_instance(session, instance_id, "released" if clean else "failed",
                   None if clean else f"worker process exited with code {returncode}")
    session.commit()


def closed_instances(session: Session, instance_ids: list[int]) -> list[int]:
    """Those of ``instance_ids`` that are failed or released in Postgres."""
    rows = session.scalars(select(Instance.id).where(
        Instance.id.in_(instance_ids), Instance.status.in_(("failed", "released")))).all()
    session.commit()
    return list(rows)


def set_pid(session: Session, instance_id: int, pid: int) -> None:
    session.execute(update(Instance).where(Instance.id == instance_id).values(pid=pid))
    session.commit()
