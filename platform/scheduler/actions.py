"""What the scheduler does to the cluster: start planned groups, stop idle or broken ones,
take silent nodes out. Each writes Postgres first (through the cluster service), then sends
node tasks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kombu.exceptions import KombuError
from sqlalchemy import select
from sqlalchemy.orm import Session

from gpu_runtime.limits import MAX_PP
from hydraserve.broker import node_queue
from hydraserve.cluster import consolidation as consolidations
from hydraserve.cluster import presence
from hydraserve.cluster import service as cluster
from hydraserve.cluster.models import Instance
from hydraserve.cluster.models import Plan as PlanRow
from hydraserve.cluster.service import StageRecord
from hydraserve.db import must_get
from hydraserve.functions.models import FunctionVersion
from hydraserve.scheduler import profiles, state
from hydraserve.scheduler.planner import Plan, PlannerConfig, Request, plan_cold_start

log = logging.getLogger("hydraserve.scheduler")
AVOID_FAILED_S = 30.0  # a node that refused a start of a version is passed over this long


@dataclass(frozen=True, slots=True)
class Profile:
    """First guesses of a model's standalone speed, until the requests it serves measure it
    (scheduler/profiles.py): decode reads every weight once per token, prefill of a short
    prompt costs a few decode steps."""

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

    def consolidate(self, node_id: str, instance_id: int) -> None:
        self.app.send_task("node.consolidate", args=[instance_id],
                           queue=node_queue(node_id, self.prefix))

    def stop_stage(self, node_id: str, instance_id: int, kill: bool = False) -> None:
        self.app.send_task("node.stop_stage", args=[instance_id, kill],
                           queue=node_queue(node_id, self.prefix))


def num_layers(config: dict) -> int:
    """Decoder layers of a checkpoint, from its config.json as stored at registration (every
    supported architecture names them num_hidden_layers)."""
    return int(config.get("num_hidden_layers") or MAX_PP)


BLOCK_SIZE = 16  # tokens per KV block (gpu_runtime.coldstart.plan.EngineShape)
ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_block_bytes(config: dict, dtype: str) -> int:
    """One block of KV over every decoder layer, from the stored config.json (keys and values
    of BLOCK_SIZE tokens: what gpu_runtime.kv_cache.bytes_per_block computes on the node)."""
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size") or heads) // heads)
    return 2 * num_layers(config) * BLOCK_SIZE * kv_heads * head_dim * ELEM_BYTES.get(dtype, 4)


def plan_for(session: Session, fv: FunctionVersion, queued: int, waited_s: float,
             cfg: PlannerConfig, profile: Profile,
             avoid_failed_s: float = AVOID_FAILED_S) -> Plan | None:
    """The plan of one more group of ``fv``. Nodes where one of its starts failed within
    ``avoid_failed_s`` are left out while a plan without them exists: the planner does not
    see why a node refused (a full cache pool, say), and would choose the same node again."""
    m = fv.model.total_bytes
    speed = profiles.model_speed(session, fv.model_id, profile.tpot_s(m), profile.prefill_s(m))
    req = Request(model_id=fv.model_id, model_bytes=m, ttft_slo_s=fv.ttft_ms / 1000,
                  tpot_slo_s=fv.tpot_ms / 1000, tpot_s=speed.tpot_s, prefill_s=speed.prefill_s,
                  waited_s=waited_s, demand=max(queued, 1), num_layers=num_layers(fv.model.config),
                  kv_block_bytes=kv_block_bytes(fv.model.config, fv.model.dtype))
    cfg = profiles.planner_config(session, cfg)
    nodes = state.nodes_snapshot(session)
    refused = state.failed_start_nodes(session, fv.id, avoid_failed_s)
    elsewhere = [n for n in nodes if n.node_id not in refused]
    plan = plan_cold_start(req, elsewhere, cfg) if refused and elsewhere else None
    return plan or plan_cold_start(req, nodes, cfg)


def launch(session: Session, sender: Sender, fv: FunctionVersion, plan: Plan,
           policy: str = "hydra", consolidation: bool = True) -> int:
    """Records the plan (made under ``policy``, with its consolidation target when
    ``consolidation`` is on), its instances and their usage records, then starts every
    stage."""
    deadline = {node: r.seconds_left for node, r in plan.reservations.items()}
    stages = [StageRecord(s.stage, s.node_id, s.device_id, s.memory_bytes, s.full_share,
                          s.fetch_bytes, deadline.get(s.node_id, 0)) for s in plan.stages]
    target = consolidations.target_of(
        [{"full_share": s.full_share, "memory_bytes": s.memory_bytes} for s in plan.stages],
        fv.model.total_bytes, consolidation)
    instances = cluster.record_group(session, fv, plan.pp, stages, plan.reason,
                                     plan.predicted_ttft_s, plan.predicted_tpot_s, policy,
                                     target)
    try:
        for inst in instances:
            sender.start_stage(inst.node_id, inst.id)
    except (KombuError, OSError) as exc:  # the broker is away: fail the group, plan again later
        for inst in instances:
            cluster.close_instance(session, inst.id, "failed", f"could not send start task: {exc}")
        session.commit()
        raise
    plan_id = instances[0].plan_id
    assert plan_id is not None, f"instance {instances[0].id} was recorded without its plan"
    log.info("function version %s: plan %s pp=%d on %s (%s)", fv.id, plan_id, plan.pp,
             [s.node_id for s in plan.stages], plan.reason)
    return plan_id


def consolidate(session: Session, sender: Sender, head: Instance, plan: PlanRow) -> None:
    """A group that is ready: starts its planned consolidation (the stage-0 node fetches the
    rest of the model) or records why it stays a pipeline. Committed once the task is sent."""
    if plan.consolidation_target is None:
        consolidations.set_state(session, plan.id, "skipped")
        session.commit()
        return
    model_bytes = must_get(session, FunctionVersion, plan.function_version_id).model.total_bytes
    replicas = consolidations.replica_stages(plan.stages, model_bytes)
    consolidations.set_state(session, plan.id, "consolidating",
                             stats={"replica_stages": replicas})
    session.flush()
    group = {i.stage_index: i for i in session.scalars(
        select(Instance).where(Instance.plan_id == plan.id))}
    for stage in [0, *replicas]:  # stage 0 consolidates, the other full shares become replicas
        sender.consolidate(group[stage].node_id, group[stage].id)
    session.commit()
    log.info("plan %s: consolidating pp=%d -> %d on node %s", plan.id, plan.pp,
             plan.consolidation_target, head.node_id)


def broke_while_consolidating(session: Session, plan_id: int | None, live: int,
                              stages: int) -> None:
    """A group that breaks before its switch ends its consolidation as failed (its requests
    go back to the queue with the group, as for any broken group); no commit."""
    if plan_id is None:
        return
    plan = session.get(PlanRow, plan_id)
    if plan is not None and plan.consolidation_state == "consolidating":
        consolidations.set_state(session, plan_id, "failed", f"the group broke while "
                                 f"consolidating ({live} of {stages} stages live)")


def stop_group(session: Session, sender: Sender, group: list[Instance], kill: bool) -> None:
    """Marks a group stopping. Graceful: only stage 0 is signalled; it finishes what it holds
    and stops the ring, so the other stages end after it. ``kill``: every stage at once. A
    consolidation still under way ends ``failed``: the group stopped before its switch."""
    cluster.mark_stopping(session, group)
    if group and group[0].plan_id is not None:
        consolidations.set_state(session, group[0].plan_id, "failed", "the group was stopped "
                                 "before its switch", only_from="consolidating")
    for inst in group:
        if kill or inst.stage_index == 0:
            sender.stop_stage(inst.node_id, inst.id, kill)
    # committed only once every signal is sent: when the broker is away the group stays as it
    # was (the caller's session rolls back) and the next pass decides again
    session.commit()


def mark_silent_nodes_down(session: Session, timeout_s: float) -> list[str]:
    down = cluster.mark_silent_nodes_down(session, timeout_s)
    for node_id in down:
        log.warning("node %s missed heartbeats for %.0f s: down", node_id, timeout_s)
    return down


def take_out_absent_nodes(session: Session, node_ids: list[str]) -> None:
    """Nodes whose agent's presence session has ended go down (commits when there are any)."""
    if not node_ids:
        return
    presence.take_out(session, node_ids)
    for node_id in node_ids:
        log.warning("node %s: its agent's presence session ended: down", node_id)
