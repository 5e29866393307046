"""The cluster scheduler's decisions against real Postgres, one rolled-back transaction per test.

Nodes are registered rows, functions are PUT through the API, invocations are inserted rows, and
the ``Sender`` seam records the node tasks a pass would send (no Celery, no RabbitMQ). Time is
moved by backdating timestamps. Covered: scale-out (plan, instances, usage, starts; no second
group while one starts; more groups above MAX_BATCH per group; max_instances; nothing fits),
scale-in past keep-alive, min_instances and prewarm, broken and stuck groups, orphaned requests,
silent nodes, nodes whose agent's presence session ended, and requests queued too long.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from kombu.exceptions import OperationalError
from sqlalchemy import select, update

from hydraserve.billing.models import UsageRecord
from hydraserve.cluster import presence
from hydraserve.cluster import service as cluster
from hydraserve.cluster.models import MAX_BATCH, Instance, Node, Plan
from hydraserve.cluster.service import DeviceSpec
from hydraserve.db import utcnow
from hydraserve.functions.models import Function, FunctionVersion
from hydraserve.invocations.models import Invocation
from hydraserve.scheduler import actions
from hydraserve.scheduler.loop import Scheduler

ROOMY, TINY = 4 << 30, 1000  # device memory: fits the demo model several times / not at all


def add_nodes(s, *node_ids: str, memory: int = ROOMY) -> None:
    for node_id in node_ids:
        cluster.register(s, node_id, f"10.0.0.{len(node_id)}", None,
                         [DeviceSpec(0, "cpu", memory)], {})


def step(sched: Scheduler, name: str = "full_pass") -> None:
    """Runs one decision of the scheduler on a fresh session (as ``tick`` does, minus the
    catch-all, so errors surface)."""
    with sched.sessions() as fresh:
        getattr(sched, name)(fresh)


def read(s, model, *where) -> list:
    s.expire_all()
    return list(s.scalars(select(model).where(*where).order_by(model.id)))


def backdate(s, model, column: str, seconds: float, *where) -> None:
    s.execute(update(model).where(*where).values({column: utcnow() - timedelta(seconds=seconds)}))
    s.commit()
    s.expire_all()


def enqueue(s, fv: FunctionVersion, n: int, status: str = "queued",
            instance_ids: list[int] | None = None) -> list[str]:
    fn = s.get(Function, fv.function_id)
    ids = [f"inv_{uuid.uuid4().hex}" for _ in range(n)]
    s.add_all(Invocation(id=i, tenant_id=fn.tenant_id, function_id=fn.id,
                         function_version_id=fv.id, status=status, request={"kind": "invoke"},
                         instance_ids=instance_ids or [], queued_at=utcnow()) for i in ids)
    s.commit()
    return ids


def group(sched: Scheduler, s, fv: FunctionVersion, demand: int = 1, ready: bool = True,
          idle_s: float = 0) -> list[Instance]:
    """Starts a group the way scale-out does (nothing sent is kept), optionally ready and idle."""
    plan = actions.plan_for(s, fv, demand, 0.0, sched.cfg, sched.profile)
    plan_id = actions.launch(s, sched.sender, fv, plan)
    sched.sender.take()
    insts = read(s, Instance, Instance.plan_id == plan_id)
    if ready:
        cluster.mark_ready(s, tuple(i.id for i in insts), {})
    if idle_s:
        backdate(s, Instance, "last_active_at", idle_s, Instance.plan_id == plan_id)
    return read(s, Instance, Instance.plan_id == plan_id)


def statuses(s, insts: list[Instance]) -> list[str]:
    return [i.status for i in read(s, Instance, Instance.id.in_([i.id for i in insts]))]


# ---- scale-out -----------------------------------------------------------------------------

def test_queued_demand_plans_a_group_records_it_and_starts_every_stage(sched, s, function):
    add_nodes(s, "a", "b")
    fv = function()
    queued = enqueue(s, fv, 2)  # two requests over two nodes: a pipeline of two full shares
    step(sched, "scale_out")
    (plan,) = read(s, Plan)
    insts = read(s, Instance)
    assert (plan.function_version_id, plan.pp, plan.status) == (fv.id, 2, "started")
    assert [(i.stage_index, i.num_stages, i.status, i.plan_id) for i in insts] == [
        (0, 2, "starting", plan.id), (1, 2, "starting", plan.id)]
    assert sorted(i.node_id for i in insts) == ["a", "b"]
    assert sched.sender.take() == [("start", i.node_id, i.id) for i in insts]
    usage = read(s, UsageRecord)
    assert [(u.instance_id, u.function_id, u.device_kind, u.ended_at) for u in usage] == [
        (i.id, fv.function_id, "cpu", None) for i in insts]
    assert {i.status for i in read(s, Invocation, Invocation.id.in_(queued))} == {"queued"}


def test_no_second_group_while_one_is_starting_whatever_the_demand(sched, s, function):
    add_nodes(s, "a")
    fv = function()
    enqueue(s, fv, 1)
    step(sched, "scale_out")
    assert [t[0] for t in sched.sender.take()] == ["start"]
    enqueue(s, fv, MAX_BATCH + 5)
    step(sched, "scale_out")
    step(sched)
    assert sched.sender.take() == [] and len(read(s, Plan)) == 1


def test_demand_above_max_batch_per_ready_group_adds_a_group(sched, s, function):
    add_nodes(s, "a")
    fv = function()
    first = group(sched, s, fv)
    enqueue(s, fv, MAX_BATCH)
    step(sched, "scale_out")
    assert sched.sender.take() == []  # MAX_BATCH per group is what one group takes at once
    enqueue(s, fv, 1)
    step(sched, "scale_out")
    new = read(s, Instance, Instance.id != first[0].id)
    assert [(i.node_id, i.status) for i in new] == [("a", "starting")]
    assert sched.sender.take() == [("start", "a", new[0].id)]


def fail_starts(sched, s, error: str) -> None:
    """Plans a start and has its node report that it failed before it was ready."""
    step(sched, "scale_out")
    for inst in read(s, Instance, Instance.status == "starting"):
        cluster.fail_start(s, inst.id, error)
    s.commit()
    sched.sender.take()


def test_failed_starts_back_off_then_mark_the_version_unservable(sched, s, function, client,
                                                                 acme):
    add_nodes(s, "a")
    fv = function()
    queued = enqueue(s, fv, 2)
    fail_starts(sched, s, "ChecksumError: model.safetensors bytes 0..4096 fail their sha256")
    step(sched, "scale_out")
    assert sched.sender.take() == []  # backing off: the failure is recent
    backdate(s, Instance, "released_at", 1.5, Instance.function_version_id == fv.id)
    fail_starts(sched, s, "ChecksumError: model.safetensors bytes 0..4096 fail their sha256")
    step(sched, "scale_out")
    assert sched.sender.take() == []  # the second failure waits twice as long
    backdate(s, Instance, "released_at", 2.5, Instance.function_version_id == fv.id)
    fail_starts(sched, s, "UnsupportedModelError: rope_scaling type 'yarn'")
    assert len(read(s, Instance, Instance.function_version_id == fv.id)) == 3
    step(sched, "scale_out")  # the third failure: unservable, its queue fails with the cause
    assert sched.sender.take() == []
    s.expire_all()
    assert "yarn" in s.get(FunctionVersion, fv.id).unservable_reason
    for inv_id in queued:
        inv = s.get(Invocation, inv_id)
        assert inv.status == "failed" and inv.error["type"] == "invalid_model_error"
        assert "cannot start" in inv.error["message"] and "yarn" in inv.error["message"]
    resp = client.post("/v1/functions/fn/invocations", json={"prompt_ids": [1, 2]}, headers=acme)
    assert resp.status_code == 422 and "yarn" in resp.json["error"]["message"]  # refused at once
    assert client.get("/v1/functions/fn", headers=acme).json["spec"]["unservable"]["reason"]
    enqueue(s, fv, 1)
    step(sched, "scale_out")
    assert sched.sender.take() == []  # never planned again


def test_an_admin_clears_an_unservable_version_and_a_new_version_starts_clean(
        sched, s, function, client, acme, admin, register):
    add_nodes(s, "a")
    fv = function()
    enqueue(s, fv, 1)
    for _ in range(3):
        backdate(s, Instance, "released_at", 10, Instance.function_version_id == fv.id)
        fail_starts(sched, s, "RuntimeError: the worker could not load its stage")
    step(sched, "scale_out")
    s.expire_all()
    assert s.get(FunctionVersion, fv.id).unservable_reason is not None
    resp = client.post("/v1/admin/tenants/acme/functions/fn/clear-unservable", headers=admin)
    assert resp.status_code == 200 and resp.json["spec"]["unservable"] is None, resp.json
    again = client.post("/v1/admin/tenants/acme/functions/fn/clear-unservable", headers=admin)
    assert again.status_code == 409  # nothing to clear
    backdate(s, Instance, "released_at", 100, Instance.function_version_id == fv.id)
    backdate(s, FunctionVersion, "starts_cleared_at", 50, FunctionVersion.id == fv.id)
    enqueue(s, fv, 1)
    step(sched, "scale_out")
    assert [m[0] for m in sched.sender.take()] == ["start"]  # the old failures no longer count
    for inst in read(s, Instance, Instance.status == "starting"):
        cluster.fail_start(s, inst.id, "RuntimeError: again")
    s.commit()
    after_clear = Instance.released_at > utcnow() - timedelta(seconds=50)
    for _ in range(2):
        backdate(s, Instance, "released_at", 10, Instance.function_version_id == fv.id,
                 after_clear)
        fail_starts(sched, s, "RuntimeError: again")
    step(sched, "scale_out")
    s.expire_all()
    assert s.get(FunctionVersion, fv.id).unservable_reason is not None
    patched = client.patch("/v1/functions/fn", json={"description": "fixed"}, headers=acme)
    assert patched.status_code == 200, patched.json
    resp = client.post("/v1/functions/fn/invocations", json={"prompt_ids": [1, 2]},
                       headers=acme | {"Prefer": "respond-async"})
    assert resp.status_code == 202, resp.json  # the new version starts clean


def test_a_node_that_dies_during_a_start_does_not_count_against_the_version(sched, s,
                                                                            function):
    add_nodes(s, "a")
    fv = function()
    enqueue(s, fv, 1)
    for _ in range(4):
        step(sched, "scale_out")
        sched.sender.take()
        add_nodes(s, "a")  # the node agent restarted: its starting instance is gone
    assert cluster.start_failures(s, s.get(FunctionVersion, fv.id)).count == 0
    step(sched, "scale_out")
    assert [m[0] for m in sched.sender.take()] == ["start"]


def test_a_start_a_node_refused_is_planned_on_another_node(sched, s, function):
    add_nodes(s, "a", "b")
    fv = function()
    enqueue(s, fv, 1)
    step(sched, "scale_out")
    (first,) = read(s, Instance)
    cluster.fail_instance(s, first.id, "CacheFullError: buffer m1/pp1-s0 needs 1048576 bytes")
    sched.sender.take()
    step(sched, "scale_out")  # the planner alone would choose the same node again
    (again,) = read(s, Instance, Instance.id != first.id)
    assert {again.node_id, first.node_id} == {"a", "b"}, (first.node_id, again.node_id)
    cluster.fail_instance(s, again.id, "CacheFullError: the other pool is full too")
    step(sched, "scale_out")  # every node refused it: they are all tried again
    assert len(read(s, Instance, Instance.status == "starting")) == 1


def test_max_instances_caps_the_groups(sched, s, function):
    add_nodes(s, "a", "b")
    fv = function(max_instances=1)
    group(sched, s, fv)
    enqueue(s, fv, 4 * MAX_BATCH)
    step(sched, "scale_out")
    assert sched.sender.take() == [] and len(read(s, Plan)) == 1


def test_when_no_node_fits_nothing_is_sent_and_requests_stay_queued(sched, s, function):
    add_nodes(s, "small", memory=TINY)
    fv = function()
    queued = enqueue(s, fv, 3)
    step(sched)
    assert sched.sender.take() == []
    assert read(s, Plan) == [] and read(s, Instance) == []
    assert [i.status for i in read(s, Invocation, Invocation.id.in_(queued))] == ["queued"] * 3


def test_a_node_cache_without_room_gets_no_stage_and_a_planned_fetch_uses_room(sched, s,
                                                                               function):
    """The room a node's heartbeat reports in its cache (``info.cache_room``), less the
    fetches planned onto it since that heartbeat, bounds what the planner sends it."""
    from hydraserve.cluster.models import Node
    from hydraserve.scheduler.state import nodes_snapshot

    add_nodes(s, "full", "roomy")
    fv = function()
    model_bytes = fv.model.total_bytes
    roomy = model_bytes * 3 + (8 << 20)  # its cache could evict enough for three copies
    for node_id, room in (("full", model_bytes // 2), ("roomy", roomy)):
        cluster.heartbeat(s, node_id, {"cache_room": room})
    s.commit()
    enqueue(s, fv, 1)
    step(sched, "scale_out")
    assert [i.node_id for i in read(s, Instance)] == ["roomy"]
    with sched.sessions() as fresh:
        rooms = {n.node_id: n.cache_room for n in nodes_snapshot(fresh)}
    # the fetch just planned on roomy is counted until a heartbeat after it
    fetched = read(s, Plan)[0].stages[0]["fetch_bytes"]
    assert fetched > 0 and rooms == {"full": model_bytes // 2, "roomy": roomy - fetched}
    assert read(s, Node, Node.id == "roomy")[0].info["cache_room"] == roomy


def test_a_node_whose_booted_workers_are_taken_waits_a_boot_in_the_next_plan(sched, s,
                                                                           function):
    """A node's heartbeat reports its booted idle workers and how long its latest boot took;
    stages planned there since count against the idle ones, so the next cold start goes to
    a node that still has one (as its stage would otherwise wait for a boot)."""
    from hydraserve.scheduler.state import nodes_snapshot

    add_nodes(s, "a", "b")
    for node_id in ("a", "b"):
        cluster.heartbeat(s, node_id, {"idle_workers": 1, "boot_s": 9.5})
    s.commit()
    first, second = function(name="first"), function(name="second")
    enqueue(s, first, 1)
    step(sched, "scale_out")
    (taken,) = read(s, Instance)
    add_nodes(s, "pool-less")  # it reports no boot: a fresh process per start, alike for all
    with sched.sessions() as fresh:
        waits = {n.node_id: n.boot_wait_s for n in nodes_snapshot(fresh)}
    idle = {"a", "b"} - {taken.node_id}
    assert waits == {taken.node_id: 9.5, idle.pop(): 0.0, "pool-less": 0.0}
    # a heartbeat after the start reports the replacement still booting: the wait stays
    cluster.heartbeat(s, taken.node_id, {"idle_workers": 0, "boot_s": 9.5})
    s.commit()
    enqueue(s, second, 1)
    step(sched, "scale_out")
    placed = read(s, Instance, Instance.function_version_id == second.id)
    assert [i.node_id for i in placed] != [taken.node_id]
    assert "worker to boot" not in read(s, Plan)[-1].reason


def test_a_workspace_measured_by_an_earlier_worker_sizes_the_next_start(sched, s, function):
    """A CUDA worker measures its stage's workspace and the node stores it in the timeline;
    the next start of the same stage sizes its KV cache with that, not the bound."""
    from gpu_runtime.config import parse_config
    from gpu_runtime.memory import workspace_bytes
    from hydraserve.tasks.node.assignment import load_assignment

    add_nodes(s, "a")
    fv = function()
    enqueue(s, fv, 1)
    step(sched, "scale_out")
    (inst,) = read(s, Instance)
    bound = workspace_bytes(parse_config(fv.model.config), 4 if fv.model.dtype == "float32"
                            else 2)
    assert load_assignment(s, inst.id).workspace_bytes == bound
    cluster.add_timeline(s, inst.id, {"memory": {"workspace_measured": None}})
    assert load_assignment(s, inst.id).workspace_bytes == bound  # CPU: nothing measured
    cluster.add_timeline(s, inst.id, {"memory": {"workspace_measured": 12345}})
    a = load_assignment(s, inst.id)
    assert a.workspace_bytes == 12345 and a.memory.workspace == 12345


# ---- scale-in, keep-alive and min_instances ------------------------------------------------

def test_idle_group_past_keep_alive_is_stopped_gracefully_through_stage_0(sched, s, function):
    add_nodes(s, "a", "b")
    fv = function(keep_alive_s=60)
    insts = group(sched, s, fv, demand=2, idle_s=120)
    assert len(insts) == 2
    step(sched, "scale_in")
    assert sched.sender.take() == [("stop", insts[0].node_id, insts[0].id, False)]
    assert statuses(s, insts) == ["stopping", "stopping"]


def test_group_active_within_keep_alive_is_kept(sched, s, function):
    add_nodes(s, "a")
    fv = function(keep_alive_s=60)
    insts = group(sched, s, fv, idle_s=30)
    step(sched)
    assert sched.sender.take() == [] and statuses(s, insts) == ["ready"]


def test_min_instances_keeps_the_last_idle_group(sched, s, function):
    add_nodes(s, "a", "b")
    fv = function(min_instances=1, keep_alive_s=0)
    groups = [group(sched, s, fv, idle_s=100), group(sched, s, fv, idle_s=100)]
    step(sched)
    (stop,) = sched.sender.take()
    assert stop[0] == "stop" and stop[3] is False
    assert sorted(statuses(s, g)[0] for g in groups) == ["ready", "stopping"]


def test_a_group_still_stopping_does_not_count_toward_min_instances(sched, s, function):
    add_nodes(s, "a", "b")
    fv = function(min_instances=1, keep_alive_s=0)
    groups = [group(sched, s, fv, idle_s=100), group(sched, s, fv, idle_s=100)]
    step(sched, "scale_in")
    assert len(sched.sender.take()) == 1
    step(sched, "scale_in")  # the stopped group has not exited yet
    assert sched.sender.take() == []
    assert sorted(statuses(s, g)[0] for g in groups) == ["ready", "stopping"]


def test_a_stop_that_cannot_be_sent_leaves_the_group_as_it_was_for_the_next_pass(
        sched, s, function):
    add_nodes(s, "a")
    fv = function(keep_alive_s=0)
    (inst,) = group(sched, s, fv, idle_s=100)
    sched.sender.broker_down = True
    with pytest.raises(OperationalError):
        step(sched, "scale_in")
    assert statuses(s, [inst]) == ["ready"]
    sched.sender.broker_down = False
    step(sched, "scale_in")
    assert sched.sender.take() == [("stop", "a", inst.id, False)]
    assert statuses(s, [inst]) == ["stopping"]


def test_min_instances_prewarms_a_group_on_a_full_pass_only(sched, s, function):
    add_nodes(s, "a")
    fv = function(min_instances=1)
    sched.react({fv.function_id})  # a reaction to requests plans for demand only
    assert sched.sender.take() == []
    step(sched)
    (inst,) = read(s, Instance)
    assert (inst.function_version_id, inst.status) == (fv.id, "starting")
    assert sched.sender.take() == [("start", "a", inst.id)]
    step(sched)
    assert sched.sender.take() == []


def test_old_version_and_deleted_function_get_no_min_instances(sched, s, function, client, acme):
    add_nodes(s, "a", "b")
    v1 = function(min_instances=1, keep_alive_s=0)
    old = group(sched, s, v1, idle_s=100)
    assert client.patch("/v1/functions/fn", json={"description": "v2"},
                        headers=acme).status_code == 200
    v2 = read(s, FunctionVersion, FunctionVersion.function_id == v1.function_id,
              FunctionVersion.version == 2)[0]
    assert (sched.min_instances(s, v1), sched.min_instances(s, v2)) == (0, 1)
    step(sched)  # v1 idle goes, v2 is prewarmed
    sent = sched.sender.take()
    (new,) = read(s, Instance, Instance.function_version_id == v2.id)
    assert sent == [("stop", old[0].node_id, old[0].id, False), ("start", new.node_id, new.id)]
    assert client.delete("/v1/functions/fn", headers=acme).status_code == 200
    assert sched.min_instances(s, read(s, FunctionVersion, FunctionVersion.id == v2.id)[0]) == 0
    assert sched.prewarm_versions(s) == []


# ---- broken and stuck groups ---------------------------------------------------------------

def test_group_with_a_failed_stage_is_killed_on_every_live_stage(sched, s, function,
                                                                 store_root):
    add_nodes(s, "a", "b", "c")
    fv = function(model=(store_root / "llama-small").as_uri())  # 4 layers: room for pp=3
    broken, healthy = group(sched, s, fv, demand=3), group(sched, s, fv)
    assert len(broken) == 3
    cluster.fail_instance(s, broken[1].id, "worker process exited with code 1")
    step(sched, "stop_broken_groups")
    assert sched.sender.take() == [("stop", i.node_id, i.id, True) for i in (broken[0], broken[2])]
    assert statuses(s, broken) == ["stopping", "failed", "stopping"]
    assert statuses(s, healthy) == ["ready"]
    step(sched, "stop_broken_groups")
    assert sched.sender.take() == []


def test_group_whose_stage_0_ended_is_killed_once(sched, s, function):
    add_nodes(s, "a", "b")
    fv = function()
    insts = group(sched, s, fv, demand=2)
    cluster.close_instance(s, insts[0].id, "released")
    s.commit()
    step(sched, "stop_broken_groups")
    assert sched.sender.take() == [("stop", insts[1].node_id, insts[1].id, True)]
    assert statuses(s, insts) == ["released", "stopping"]
    step(sched, "stop_broken_groups")  # signalled already: its stage closes when it exits
    assert sched.sender.take() == []


def test_stage_starting_past_start_timeout_fails_and_its_group_is_killed(sched, s, function):
    add_nodes(s, "a", "b")
    fv = function()
    insts = group(sched, s, fv, demand=2, ready=False)
    backdate(s, Instance, "created_at", 120, Instance.id == insts[1].id)
    step(sched, "stop_broken_groups")
    assert sched.sender.take() == [("stop", insts[0].node_id, insts[0].id, True)]
    stuck = read(s, Instance, Instance.id == insts[1].id)[0]
    assert (stuck.status, stuck.error) == ("failed", "not ready after 60 s")
    assert statuses(s, insts) == ["stopping", "failed"]
    (usage,) = read(s, UsageRecord, UsageRecord.instance_id == stuck.id)
    assert usage.ended_at == stuck.released_at


# ---- requests, nodes -----------------------------------------------------------------------

def test_running_requests_of_a_dead_group_go_back_to_queued(sched, s, function):
    add_nodes(s, "a", "b")
    fv = function()
    dead, gone, alive = (group(sched, s, fv) for _ in range(3))
    cluster.fail_instance(s, dead[0].id, "worker process exited with code 9")
    cluster.close_instance(s, gone[0].id, "released")
    s.commit()
    orphans = enqueue(s, fv, 2, "running", [dead[0].id]) + enqueue(s, fv, 1, "running",
                                                                   [gone[0].id])
    kept = enqueue(s, fv, 2, "running", [alive[0].id])
    step(sched)
    assert sched.sender.take() == []  # a ready group is left for 3 queued requests
    by_id = {i.id: i.status for i in read(s, Invocation)}
    assert [by_id[i] for i in orphans] == ["queued"] * 3
    assert [by_id[i] for i in kept] == ["running"] * 2


def test_silent_node_goes_down_and_its_stages_fail(sched, s, function):
    add_nodes(s, "a", "b")
    fv = function()
    insts = group(sched, s, fv, demand=2)
    on_a = next(i for i in insts if i.node_id == "a")
    on_b = next(i for i in insts if i.node_id == "b")
    backdate(s, Node, "last_heartbeat_at", 30, Node.id == "a")
    step(sched)
    assert [(n.id, n.status) for n in read(s, Node)] == [("a", "down"), ("b", "up")]
    failed = read(s, Instance, Instance.id == on_a.id)[0]
    assert (failed.status, failed.error) == ("failed", "node a stopped heartbeating")
    # the group lost a stage: the one left on b is killed in the same pass
    assert sched.sender.take() == [("stop", "b", on_b.id, True)]
    assert read(s, Instance, Instance.id == on_b.id)[0].status == "stopping"


def present(s, *node_ids: str) -> None:
    """Registers nodes whose heartbeat info names a presence lock, as node agents do."""
    for node_id in node_ids:
        cluster.register(s, node_id, "127.0.0.1", None, [DeviceSpec(0, "cpu", ROOMY)],
                         {"presence_key": presence.lock_key(node_id)})


def test_a_node_whose_presence_session_ended_goes_down_after_the_grace(
        settings, session_factory, sender, s, function):
    sched = Scheduler(settings, sender=sender, sessions=session_factory,
                      heartbeat_timeout_s=10, presence_grace_s=0.3)
    present(s, "a", "b", "c")
    holder = presence.Presence(settings.database_url, "b", check_s=0.05).start()
    try:
        assert holder.held.is_set()
        insts = group(sched, s, function(), demand=1)
        on_a = next(i for i in insts if i.node_id == "a")
        backdate(s, Node, "last_heartbeat_at", 5, Node.id.in_(["a", "b"]))
        step(sched, "take_out_dead_nodes")  # the first look at a free lock only starts the grace
        assert [n.status for n in read(s, Node)] == ["up", "up", "up"]
        time.sleep(0.4)
        cluster.heartbeat(s, "c", {"presence_key": presence.lock_key("c")})
        assert step_down(sched) == ["a"]  # b's lock is held; c has just heartbeaten
        assert [(n.id, n.status) for n in read(s, Node)] == [("a", "down"), ("b", "up"),
                                                             ("c", "up")]
        failed = read(s, Instance, Instance.id == on_a.id)[0]
        assert (failed.status, failed.error) == (
            "failed", "node a's agent is gone (its presence session ended)")
    finally:
        holder.close()
    assert not holder.held.is_set()
    assert step_down(sched) == []  # b's session ended with close(): the grace starts
    time.sleep(0.4)
    cluster.heartbeat(s, "c", {"presence_key": presence.lock_key("c")})
    assert step_down(sched) == ["b"]


def test_a_failed_pass_restarts_the_grace(settings, session_factory, sender, s):
    sched = Scheduler(settings, sender=sender, sessions=session_factory, presence_grace_s=0.3)
    present(s, "a")
    backdate(s, Node, "last_heartbeat_at", 5, Node.id == "a")
    step(sched, "take_out_dead_nodes")
    time.sleep(0.4)
    sched._pass(lambda _s: (_ for _ in ()).throw(OSError("database restarting")))
    assert step_down(sched) == []  # what was seen before the outage does not count
    time.sleep(0.4)
    assert step_down(sched) == ["a"]


def test_a_node_without_a_presence_lock_is_judged_by_heartbeats_alone(sched, s):
    add_nodes(s, "old")  # registered with no presence_key (an older agent, a test)
    backdate(s, Node, "last_heartbeat_at", 5, Node.id == "old")
    sched.presence_grace_s = 0.0
    assert step_down(sched) == [] and step_down(sched) == []
    backdate(s, Node, "last_heartbeat_at", 30, Node.id == "old")
    assert step_down(sched) == ["old"]


def step_down(sched: Scheduler) -> list[str]:
    with sched.sessions() as fresh:
        return sched.take_out_dead_nodes(fresh)


def test_requests_queued_past_max_queue_s_fail_as_service_unavailable(sched, s, function):
    add_nodes(s, "small", memory=TINY)
    fv = function()
    old, young = enqueue(s, fv, 2)
    backdate(s, Invocation, "queued_at", 60, Invocation.id == old)
    step(sched)
    got = {i.id: i for i in read(s, Invocation)}
    assert (got[old].status, got[old].error["type"]) == ("failed", "service_unavailable")
    assert "not started within 30 s (HYDRA_MAX_QUEUE_S)" in got[old].error["message"]
    assert got[old].finished_at is not None
    assert (got[young].status, got[young].error) == ("queued", None)


def test_a_pipeline_whose_stages_fail_together_is_one_failed_start(s, function):
    from hydraserve.cluster.models import Device
    from hydraserve.cluster.service import StageRecord

    add_nodes(s, "a", "b")
    fv = function()
    devices = [s.scalars(select(Device).where(Device.node_id == n)).one() for n in ("a", "b")]
    group = cluster.record_group(s, fv, 2, [StageRecord(i, d.node_id, d.id, 1 << 20, i == 0,
                                                         1 << 20, 5.0)
                                            for i, d in enumerate(devices)], "test", 1.0, 0.01)
    for inst in group:
        cluster.fail_start(s, inst.id, "ChecksumError: the store served changed bytes")
    s.commit()
    failed = cluster.start_failures(s, s.get(FunctionVersion, fv.id))
    assert failed.count == 1 and "ChecksumError" in failed.last_error
