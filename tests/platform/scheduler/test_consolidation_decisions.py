"""The scheduler's consolidation decisions against real Postgres (docs/consolidation.md): the
target a plan records, the go it gives a ready group, the reason a group stays a pipeline, and
a group that breaks while consolidating."""

from __future__ import annotations

from dataclasses import replace

from hydraserve.cluster import consolidation
from hydraserve.cluster import service as cluster
from hydraserve.cluster.models import Instance, Plan
from hydraserve.scheduler.loop import Scheduler
from tests.platform.scheduler.test_decisions import add_nodes, enqueue, group, read, step


def test_a_ready_pipeline_with_a_full_share_on_stage_0_starts_consolidating(sched, s,
                                                                           function):
    add_nodes(s, "a", "b")
    fv = function()
    insts = group(sched, s, fv, demand=2)  # two requests over two nodes: pp = 2, full shares
    (plan,) = read(s, Plan)
    assert plan.pp == 2 and plan.consolidation_target == 1, plan.consolidation_reason
    assert "becomes a standalone replica" in plan.consolidation_reason
    assert plan.consolidation_state is None  # decided at plan time, started once ready
    step(sched, "consolidate")
    (plan,) = read(s, Plan)
    assert plan.consolidation_state == "consolidating"
    assert plan.consolidation_started_at is not None
    # stage 0 consolidates; stage 1, a full share too, will become a replica
    assert plan.consolidation == {"replica_stages": [1]}
    assert sched.sender.take() == [("consolidate", i.node_id, i.id) for i in insts]
    step(sched, "consolidate")  # once: a later pass sends nothing more
    assert sched.sender.take() == []


def test_a_starting_group_is_not_told_yet(sched, s, function):
    add_nodes(s, "a", "b")
    group(sched, s, function(), demand=2, ready=False)
    step(sched, "consolidate")
    assert sched.sender.take() == []
    assert read(s, Plan)[0].consolidation_state is None


def test_a_pipeline_of_part_shares_is_skipped_with_the_reason(sched, s, function):
    fv = function()
    # room for half the model's share on each device, not for the whole of it
    add_nodes(s, "a", "b", memory=int(fv.model.total_bytes * 1.25 * 0.75))
    group(sched, s, fv)
    step(sched, "consolidate")
    (plan,) = read(s, Plan)
    assert plan.pp == 2 and plan.consolidation_target is None
    assert plan.consolidation_state == "skipped"
    assert "no worker holds the whole model" in plan.consolidation_reason
    assert sched.sender.take() == []


def test_turned_off_the_group_stays_a_pipeline_and_says_so(settings, session_factory, sender,
                                                           s, function):
    sched = Scheduler(replace(settings, consolidation=False), sender=sender,
                      sessions=session_factory, heartbeat_timeout_s=10, start_timeout_s=60)
    add_nodes(s, "a", "b")
    enqueue(s, function(), 2)
    step(sched, "scale_out")  # as the scheduler plans: its own setting
    cluster.mark_ready(s, tuple(i.id for i in read(s, Instance)), {})
    step(sched, "consolidate")
    (plan,) = read(s, Plan)
    assert plan.pp == 2
    assert (plan.consolidation_target, plan.consolidation_state) == (None, "skipped")
    assert "turned off" in plan.consolidation_reason


def test_a_broker_outage_leaves_the_decision_for_the_next_pass(sched, s, function):
    add_nodes(s, "a", "b")
    group(sched, s, function(), demand=2)
    sched.sender.broker_down = True
    sched.tick()  # the pass is skipped, its writes rolled back
    assert read(s, Plan)[0].consolidation_state is None
    sched.sender.broker_down = False
    step(sched, "consolidate")
    assert read(s, Plan)[0].consolidation_state == "consolidating"


def test_a_group_that_breaks_while_consolidating_ends_it_failed(sched, s, function):
    add_nodes(s, "a", "b")
    insts = group(sched, s, function(), demand=2)
    step(sched, "consolidate")
    with sched.sessions() as fresh:  # stage 1's worker dies
        cluster.fail_instance(fresh, insts[1].id, "worker process exited with code -9")
    step(sched, "stop_broken_groups")
    (plan,) = read(s, Plan)
    assert plan.consolidation_state == "failed"
    assert plan.consolidation_reason == "the group broke while consolidating (1 of 2 stages live)"


def test_the_switch_releases_part_shares_and_makes_stage_0_standalone(sched, s, function):
    add_nodes(s, "a", "b")
    insts = group(sched, s, function(), demand=2)
    plan = read(s, Plan)[0]
    plan.stages = [plan.stages[0], plan.stages[1] | {"full_share": False}]  # a part share
    s.commit()
    step(sched, "consolidate")
    with sched.sessions() as fresh:
        released = consolidation.switched(fresh, [i.id for i in insts], {"switch_blocks": 3})
    assert released == [insts[1].id]
    head, tail = read(s, Instance)
    assert (head.status, head.num_stages) == ("ready", 1)
    assert tail.status == "stopping"  # its process's exit is now a release
    (plan,) = read(s, Plan)
    assert plan.consolidation_state == "consolidated" and plan.consolidated_at is not None
    assert plan.consolidation == {"replica_stages": [], "switch_blocks": 3}
    step(sched, "stop_broken_groups")  # a consolidated group is not a broken pipeline
    assert [i.status for i in read(s, Instance)] == ["ready", "stopping"]
    with sched.sessions() as fresh:  # a released stage makes no replica
        assert not consolidation.become_replica(fresh, tail.id)


def test_a_full_share_stage_becomes_a_replica_with_a_plan_of_its_own(sched, s, function):
    add_nodes(s, "a", "b")
    insts = group(sched, s, function(), demand=2)
    with sched.sessions() as fresh:  # not before its group consolidated
        assert not consolidation.become_replica(fresh, insts[1].id)
    step(sched, "consolidate")
    with sched.sessions() as fresh:
        assert consolidation.switched(fresh, [i.id for i in insts], {}) == []
        assert consolidation.become_replica(fresh, insts[1].id)
    old, new = read(s, Plan)
    head, replica = read(s, Instance)
    assert (replica.plan_id, replica.stage_index, replica.num_stages, replica.status) == (
        new.id, 0, 1, "ready")
    assert (new.pp, new.policy, new.stages[0]["stage"]) == (1, old.policy, 0)
    assert new.stages[0]["node_id"] == replica.node_id and new.stages[0]["full_share"]
    assert f"replica of plan {old.id}" in new.reason
    assert old.consolidation["replica_plans"] == [new.id]
    assert head.plan_id == old.id
    groups = cluster.live_groups(s)
    assert sorted(len(g) for g in groups.values()) == [1, 1]  # two standalone instances
    with sched.sessions() as fresh:  # once
        assert not consolidation.become_replica(fresh, insts[1].id)


def test_a_group_scaled_in_while_consolidating_ends_it_failed(sched, s, function):
    add_nodes(s, "a", "b")
    fv = function()
    group(sched, s, fv, demand=2, idle_s=fv.keep_alive_s + 60)
    step(sched, "consolidate")
    step(sched, "scale_in")
    (plan,) = read(s, Plan)
    assert plan.consolidation_state == "failed"
    assert plan.consolidation_reason == "the group was stopped before its switch"
    assert {i.status for i in read(s, Instance)} == {"stopping"}


def test_a_group_that_ended_before_its_switch_by_any_path_ends_it_failed(sched, s, function):
    """Every stage closed (the workers exited on their own, the node closed them) without the
    scheduler stopping the group: the next pass ends the consolidation failed, not left
    ``consolidating`` for ever (seen in the workload replay)."""
    add_nodes(s, "a", "b")
    insts = group(sched, s, function(), demand=2)
    step(sched, "consolidate")
    step(sched)  # a group still live keeps consolidating
    assert read(s, Plan)[0].consolidation_state == "consolidating"
    with sched.sessions() as fresh:
        for inst in insts:
            cluster.close_instance(fresh, inst.id, "released", "worker exited with code 0")
        fresh.commit()
    step(sched)
    (plan,) = read(s, Plan)
    assert (plan.consolidation_state, plan.consolidation_reason) == (
        "failed", "the group ended before its switch")


def test_the_rest_of_the_model_on_its_way_is_load_on_the_fetching_nodes_links(sched, s,
                                                                              function):
    """Each full-share stage of a consolidating group fetches the stages it lacks at
    background priority: the planner counts that as one more fetch on its node's link (with
    no deadline: it yields to cold starts) until the node records the fetch done; a new cold
    start then prefers a link without it."""
    import math

    from hydraserve.scheduler import actions
    from hydraserve.scheduler.state import nodes_snapshot

    def links() -> dict[str, tuple]:
        with sched.sessions() as fresh:
            return {n.node_id: n.link.fetches for n in nodes_snapshot(fresh)}

    add_nodes(s, "a", "b", "c")
    fv = function()
    insts = group(sched, s, fv, demand=2)  # pp = 2, a full share on each stage
    assert all(f == () for f in links().values())  # ready, not consolidating: no fetch
    step(sched, "consolidate")
    (plan,) = read(s, Plan)
    m = fv.model.total_bytes
    fetching = links()
    (idle,) = {"a", "b", "c"} - {i.node_id for i in insts}
    assert fetching[idle] == ()
    for inst in insts:
        (rest,) = fetching[inst.node_id]
        assert rest.bytes_left == m - math.ceil(m / 2) and rest.seconds_left == math.inf
    plan_b = actions.plan_for(s, function(name="other"), 1, 0.0, sched.cfg, sched.profile)
    assert [st.node_id for st in plan_b.stages] == [idle]  # the link with no fetch on it
    consolidation.add_stats(s, plan.id, {"fetch_s0": {"bytes": 1}})  # stage 0's node is done
    s.commit()
    after = links()
    assert after[insts[0].node_id] == () and len(after[insts[1].node_id]) == 1
    consolidation.set_state(s, plan.id, "consolidated")
    s.commit()
    assert all(f == () for f in links().values())
