"""What the scheduler does to the cluster: start planned groups, stop idle or broken ones,
take silent nodes out. Each function writes Postgres first, then sends node tasks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from kombu.exceptions import KombuError
from sqlalchemy import select
from sqlalchemy.orm import Session

from hydraserve.db.base import utcnow
from hydraserve.db.billing import UsageRecord
from hydraserve.db.cluster import Device, Instance, Node
from hydraserve.db.cluster import Plan as PlanRow
from hydraserve.db.registry import Function, FunctionVersion
from hydraserve.db.serving import Invocation
from hydraserve.messaging import node_queue
from hydraserve.scheduler import state
from hydraserve.scheduler.planner import Plan, PlannerConfig, Request, plan_cold_start
from hydraserve.services.nodes import close_instance

log = logging.getLogger("hydraserve.scheduler")
PORT_BASE, PORT_SPAN = 31000, 20000


@dataclass(frozen=True, slots=True)
class Profile:
    """Estimates of a model's standalone speed until per-model profiles are measured: decode
    reads every weight once per token, prefill of a short prompt costs a few decode steps."""

    decode_bytes_per_s: float = 5e9
    prefill_steps: float = 4.0

    def tpot_s(self, model_bytes: int) -> float:
        return model_bytes / self.decode_bytes_per_s

    def prefill_s(self, model_bytes: int) -> float:
        return self.prefill_steps * self.tpot_s(model_bytes)


class Sender:
    """Sends node tasks through Celery (a seam the tests can watch)."""

    def __init__(self, celery_app, prefix: str = "") -> None:
        self.app, self.prefix = celery_app, prefix

    def start_stage(self, node_id: str, instance_id: int) -> None:
        self.app.send_task("node.start_stage", args=[instance_id],
                           queue=node_queue(node_id, self.prefix))

    def stop_stage(self, node_id: str, instance_id: int, kill: bool = False) -> None:
        self.app.send_task("node.stop_stage", args=[instance_id, kill],
                           queue=node_queue(node_id, self.prefix))


def plan_for(session: Session, fv: FunctionVersion, queued: int, waited_s: float,
             cfg: PlannerConfig, profile: Profile) -> Plan | None:
    m = fv.model.total_bytes
    req = Request(model_id=fv.model_id, model_bytes=m, ttft_slo_s=fv.ttft_ms / 1000,
                  tpot_slo_s=fv.tpot_ms / 1000, tpot_s=profile.tpot_s(m),
                  prefill_s=profile.prefill_s(m), waited_s=waited_s, demand=max(queued, 1))
    return plan_cold_start(req, state.nodes_snapshot(session), cfg)


def launch(session: Session, sender: Sender, fv: FunctionVersion, plan: Plan) -> int:
    """Records the plan, its instances and their usage records, then starts every stage."""
    deadline = {node: r.seconds_left for node, r in plan.reservations.items()}
    row = PlanRow(function_version_id=fv.id, pp=plan.pp, status="started", reason=plan.reason,
                  predicted_ttft_ms=plan.predicted_ttft_s * 1000,
                  predicted_tpot_ms=plan.predicted_tpot_s * 1000,
                  stages=[{"stage": s.stage, "node_id": s.node_id, "device_id": s.device_id,
                           "memory_bytes": s.memory_bytes, "full_share": s.full_share,
                           "fetch_bytes": s.fetch_bytes, "deadline_s": deadline.get(s.node_id, 0)}
                          for s in plan.stages])
    session.add(row)
    session.flush()
    fn = session.get(Function, fv.function_id)
    instances = []
    for s in plan.stages:
        inst = Instance(function_version_id=fv.id, plan_id=row.id, node_id=s.node_id,
                        device_id=s.device_id, stage_index=s.stage, num_stages=plan.pp,
                        memory_bytes=s.memory_bytes, status="starting")
        session.add(inst)
        instances.append(inst)
    session.flush()
    for inst in instances:
        host = session.get(Node, inst.node_id).address or "127.0.0.1"
        inst.address = f"tcp://{host}:{PORT_BASE + inst.id % PORT_SPAN}"
        kind = session.get(Device, inst.device_id).kind
        session.add(UsageRecord(instance_id=inst.id, tenant_id=fn.tenant_id, function_id=fn.id,
                                device_kind=kind.split(":")[0], started_at=utcnow(),
                                memory_gb=Decimal(inst.memory_bytes) / Decimal(10**9)))
    session.commit()
    try:
        for inst in instances:
            sender.start_stage(inst.node_id, inst.id)
    except (KombuError, OSError) as exc:  # the broker is away: fail the group, plan again later
        for inst in instances:
            close_instance(session, inst.id, "failed", f"could not send start task: {exc}")
        session.commit()
        raise
    log.info("function version %s: plan %s pp=%d on %s (%s)", fv.id, row.id, plan.pp,
             [s.node_id for s in plan.stages], plan.reason)
    return row.id


def stop_group(session: Session, sender: Sender, group: list[Instance], kill: bool) -> None:
    """Marks a group stopping. Graceful: only stage 0 is signalled; it finishes what it holds
    and stops the ring, so the other stages end after it. ``kill``: every stage at once."""
    for inst in group:
        if inst.status in ("starting", "ready"):
            inst.status = "stopping"
    session.commit()
    for inst in group:
        if kill or inst.stage_index == 0:
            sender.stop_stage(inst.node_id, inst.id, kill)


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


def mark_silent_nodes_down(session: Session, timeout_s: float) -> list[str]:
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    silent = session.scalars(select(Node).where(Node.status == "up",
                                                Node.last_heartbeat_at < cutoff)).all()
    for node in silent:
        node.status = "down"
        lost = session.scalars(select(Instance.id).where(Instance.node_id == node.id,
                                                         Instance.status.in_(state.LIVE)))
        for instance_id in lost.all():
            close_instance(session, instance_id, "failed", f"node {node.id} stopped heartbeating")
        log.warning("node %s missed heartbeats for %.0f s: down", node.id, timeout_s)
    session.commit()
    return [n.id for n in silent]

