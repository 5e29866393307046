"""The planner as a pure function: worked examples, then properties over random clusters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runtime.limits import GB
from hydraserve.scheduler.network import Link, Reservation
from hydraserve.scheduler.planner import (
    Device,
    NodeState,
    PlannerConfig,
    Request,
    inflation,
    memory_need,
    plan_cold_start,
)

MBPS = 10**6
CFG = PlannerConfig(init_overhead_s=1.0, hop_s=0.002, kv_reserve_fraction=0.25)


def node(name: str, mbps: float = 100, free_gb: float = 40, fetches=(), cached=()) -> NodeState:
    """``cached``: ids of models the node's cache holds whole."""
    return NodeState(name, Link(mbps * MBPS, tuple(fetches)),
                     (Device(0, int(free_gb * GB)),), frozenset((m, 1, 0) for m in cached))


def request(**kw) -> Request:
    base = dict(model_id=7, model_bytes=2 * GB, ttft_slo_s=30.0, tpot_slo_s=0.2, tpot_s=0.05,
                prefill_s=0.3)
    return Request(**(base | kw))


def test_inflation_formula():
    assert inflation(1, 1) == 1
    assert inflation(4, 4) == 1  # every stage full share: standalone speed
    assert inflation(4, 1) == pytest.approx(3.25)
    assert inflation(2, 0) == 2


def test_no_more_stages_than_layers():
    # the SLO that wants pp=4 above, for a model of 2 decoder layers: pp is capped at 2
    plan = plan_cold_start(request(ttft_slo_s=7.5, num_layers=2), [node(n) for n in "abcd"], CFG)
    assert plan.pp <= 2
    one = plan_cold_start(request(ttft_slo_s=1.0, num_layers=1), [node(n) for n in "abcd"], CFG)
    assert one.pp == 1 and not one.slo_met  # the closest plan, never an impossible pipeline


def test_loose_slo_gets_pp1():
    plan = plan_cold_start(request(ttft_slo_s=60), [node("a"), node("b")], CFG)
    assert plan.pp == 1 and plan.slo_met
    # 2 GB over 100 MB/s = 20 s, + prefill 0.3 + init 1
    assert plan.predicted_ttft_s == pytest.approx(21.3)


def test_tight_ttft_needs_more_stages():
    # pp=1: 21.3 s; pp=2 with 1 full share: 10 + 0.3*1.5 + 1 = 11.45; pp=4, 1 full: 5 + 0.3*3.25 + 1
    plan = plan_cold_start(request(ttft_slo_s=12), [node(n) for n in "abcd"], CFG)
    assert plan.pp == 2 and plan.num_full == 1 and plan.slo_met
    assert plan.predicted_ttft_s == pytest.approx(11.45)
    plan = plan_cold_start(request(ttft_slo_s=7.5), [node(n) for n in "abcd"], CFG)
    assert plan.pp == 4 and plan.slo_met
    assert len({s.node_id for s in plan.stages}) == 4


def test_tpot_slo_forces_full_shares():
    # T=0.05; pp=2 with one full share inflates to 0.075 > 0.07; two full shares: 0.052
    plan = plan_cold_start(request(ttft_slo_s=12, tpot_slo_s=0.07), [node(n) for n in "abcd"], CFG)
    assert plan.pp == 2 and plan.num_full == 2
    assert plan.predicted_tpot_s == pytest.approx(0.05 + 0.002)
    assert all(s.memory_bytes == memory_need(request(), CFG, 2, True) for s in plan.stages)


def test_stage_zero_holds_a_full_share():
    plan = plan_cold_start(request(ttft_slo_s=7.5), [node(n) for n in "abcd"], CFG)
    assert plan.stages[0].full_share
    assert [s.stage for s in plan.stages] == [0, 1, 2, 3]


def test_demand_for_two_instances_asks_for_two_full_shares():
    plan = plan_cold_start(request(ttft_slo_s=60, demand=2), [node(n) for n in "abcd"], CFG)
    assert plan.pp == 2 and plan.num_full == 2


def test_cached_model_skips_the_fetch():
    nodes = [node("a", mbps=1000), node("b", mbps=10, cached=[7])]
    plan = plan_cold_start(request(ttft_slo_s=5), nodes, CFG)
    assert plan.pp == 1 and plan.stages[0].node_id == "b" and plan.stages[0].fetch_bytes == 0
    assert plan.predicted_ttft_s == pytest.approx(0.3 + 1.0)


def stages_cached(name: str, *stages: tuple[int, int, int], mbps: float = 10) -> NodeState:
    return NodeState(name, Link(mbps * MBPS), (Device(0, 40 * GB),),
                     cached_stages=frozenset(stages))


def test_a_cached_pipeline_restarts_where_its_stages_are():
    """After scale to zero, each node still holds its stage of the last pp=4 start: the next
    cold start puts every stage back on the node that holds it and fetches nothing."""
    nodes = [stages_cached("a", (7, 4, 2)), stages_cached("b", (7, 4, 0)),
             stages_cached("c", (7, 4, 3)), stages_cached("d", (7, 4, 1))]
    plan = plan_cold_start(request(ttft_slo_s=5), nodes, CFG)  # 10 MB/s: no fetch makes 5 s
    assert plan.pp == 4 and plan.slo_met and "no fetch" in plan.reason
    assert [s.node_id for s in plan.stages] == ["b", "d", "a", "c"]
    assert all(s.fetch_bytes == 0 for s in plan.stages) and not plan.reservations
    assert plan.stages[0].full_share and plan.num_full == 1


def test_a_pipeline_with_a_stage_not_cached_is_fetched_as_usual():
    nodes = [stages_cached("a", (7, 4, 0), mbps=100), stages_cached("b", (7, 4, 1), mbps=100),
             stages_cached("c", (7, 4, 2), mbps=100), stages_cached("d", (7, 2, 1), mbps=100)]
    plan = plan_cold_start(request(ttft_slo_s=60), nodes, CFG)
    assert plan.slo_met and all(s.fetch_bytes > 0 for s in plan.stages)


def test_the_smallest_cached_start_that_meets_the_slos_wins():
    nodes = [stages_cached("a", (7, 2, 0), (7, 1, 0)), stages_cached("b", (7, 2, 1))]
    plan = plan_cold_start(request(ttft_slo_s=5), nodes, CFG)
    assert plan.pp == 1 and plan.stages[0].node_id == "a" and plan.stages[0].fetch_bytes == 0
    # the node holding the whole model has no room for a full share: the cached pipeline runs
    full = memory_need(request(), CFG, 1, True)
    tight = [NodeState("a", Link(10 * MBPS), (Device(0, full - 1),),
                       cached_stages=frozenset({(7, 2, 0), (7, 1, 0)})),
             stages_cached("b", (7, 2, 1))]
    plan = plan_cold_start(request(ttft_slo_s=5), tight, CFG)
    assert plan.pp == 2 and [s.node_id for s in plan.stages] == ["a", "b"]
    assert not plan.stages[0].full_share and all(s.fetch_bytes == 0 for s in plan.stages)


def test_busy_link_is_avoided_when_joining_would_break_a_deadline():
    # node a: one fetch with 900 MB left and 10 s to go; at 100 MB/s shared by two it needs 18 s
    busy = node("a", mbps=100, fetches=[Reservation(900 * MBPS, 10.0)])
    plan = plan_cold_start(request(ttft_slo_s=60), [busy, node("b", mbps=50)], CFG)
    assert [s.node_id for s in plan.stages] == ["b"]


def test_bandwidth_share_counts_existing_fetches():
    # a has 200 MB/s with one relaxed fetch: a new fetch gets 100 MB/s, same as b alone
    relaxed = node("a", mbps=200, fetches=[Reservation(10 * MBPS, 100.0)])
    plan = plan_cold_start(request(ttft_slo_s=60), [relaxed, node("b", mbps=150)], CFG)
    assert plan.stages[0].node_id == "b"


def test_memory_best_fit_and_no_colocation():
    n = NodeState("a", Link(100 * MBPS), (Device(0, 100 * GB), Device(1, 3 * GB, num_workers=1),
                                          Device(2, 3 * GB)))
    plan = plan_cold_start(request(model_bytes=2 * GB, ttft_slo_s=60), [n], CFG)
    assert plan.stages[0].device_id == 2  # fits 2.5 GB, nothing co-located, tightest


def test_infeasible_slo_falls_back_to_best_bandwidth():
    plan = plan_cold_start(request(ttft_slo_s=1), [node("a", mbps=10), node("b", mbps=80)], CFG)
    assert plan.pp == 1 and not plan.slo_met and plan.stages[0].node_id == "b"


def test_model_larger_than_any_device_gets_part_shares():
    # 2 GB model: a full share needs 2.5 GB, a part share of pp=2 1.25 GB
    plan = plan_cold_start(request(ttft_slo_s=60), [node(n, free_gb=1.5) for n in "ab"], CFG)
    assert plan.pp == 2 and plan.num_full == 0 and plan.slo_met
    assert plan.predicted_tpot_s == pytest.approx(0.05 * 2 + 0.002)


def test_unmeetable_slo_on_small_devices_still_gets_a_pipeline():
    plan = plan_cold_start(request(ttft_slo_s=1), [node(n, free_gb=1.5) for n in "ab"], CFG)
    assert plan is not None and plan.pp == 2 and not plan.slo_met


def test_late_fallback_reserves_its_fetch_time_not_zero():
    plan = plan_cold_start(request(ttft_slo_s=1, waited_s=5), [node("a", mbps=100)], CFG)
    assert not plan.slo_met
    assert plan.reservations["a"].seconds_left >= 2 * GB / (100 * MBPS)


def test_nothing_fits_means_wait():
    assert plan_cold_start(request(model_bytes=100 * GB), [node("a", free_gb=10)], CFG) is None


def test_a_share_holds_the_weights_and_one_block_of_kv_at_least():
    """With no KV reserve the share would be the weights alone: the planner adds one block on
    the stage's layers, and a device that cannot hold it gets no plan (refused when planning,
    not at load)."""
    cfg = PlannerConfig(kv_reserve_fraction=0.0)
    req = request(num_layers=8, kv_block_bytes=8 << 20)
    assert memory_need(req, cfg, 1, True) == 2 * GB + (8 << 20)
    assert memory_need(req, cfg, 2, False) == GB + (4 << 20)  # 4 of 8 layers
    assert memory_need(req, cfg, 3, False) == -(-2 * GB // 3) + (3 << 20)  # 3 of 8 layers
    assert memory_need(req, CFG, 1, True) == int(2.5 * GB)  # the reserve holds the block
    exact = [NodeState("a", Link(100 * MBPS), (Device(0, 2 * GB + (8 << 20) - 1),))]
    assert plan_cold_start(req, exact, cfg) is None


def test_a_node_whose_cache_has_no_room_for_the_stage_is_not_chosen():
    """A node cache full of buffers mapped by live workers cannot take another stage: the
    start would fail with CacheFullError, so the planner goes elsewhere (or waits)."""
    from dataclasses import replace

    req = request()  # 2 GB
    fast_full = replace(node("fast", mbps=1000), cache_room=GB)
    slow_roomy = replace(node("slow", mbps=100), cache_room=3 * GB)
    plan = plan_cold_start(req, [fast_full, slow_roomy], CFG)
    assert [s.node_id for s in plan.stages] == ["slow"]
    # a stage of a pipeline needs its part (with room for an uneven split), not the model
    assert fast_full.can_cache(req, 2) is False and fast_full.can_cache(req, 4) is True
    assert node("unknown").can_cache(req, 1)  # no report: no constraint
    assert plan_cold_start(req, [fast_full], PlannerConfig(max_pp=1)) is None  # wait


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="max_pp must be 1..4, got 5"):
        PlannerConfig(max_pp=5)
    with pytest.raises(ValueError, match="hop_s must be >= 0"):
        PlannerConfig(hop_s=-1)


nodes_st = st.lists(
    st.builds(node, name=st.uuids().map(str), mbps=st.floats(5, 2000),
              free_gb=st.floats(0.1, 80),
              fetches=st.lists(st.builds(Reservation, st.integers(0, 5 * GB),
                                         st.floats(0.5, 120)), max_size=3)),
    min_size=1, max_size=8, unique_by=lambda n: n.node_id)
requests_st = st.builds(request, model_bytes=st.integers(GB // 10, 20 * GB),
                        ttft_slo_s=st.floats(0.5, 120), tpot_slo_s=st.floats(0.01, 1),
                        tpot_s=st.floats(0.005, 0.5), prefill_s=st.floats(0, 5),
                        waited_s=st.floats(0, 10), demand=st.integers(1, 6))


@settings(max_examples=300, deadline=None)
@given(req=requests_st, nodes=nodes_st)
def test_plans_are_sound(req, nodes):
    plan = plan_cold_start(req, nodes, CFG)
    if plan is None:  # only when no open link has a device that fits even a quarter share
        open_nodes = [n for n in nodes if n.link.admits_one_more()]
        fits = [n for n in open_nodes for pp in range(1, 5)
                if sum(any(d.free_bytes >= memory_need(req, CFG, pp, False) for d in m.devices)
                       for m in open_nodes) >= pp]
        assert not fits, (req, nodes)
        return
    by_id = {n.node_id: n for n in nodes}
    assert len({s.node_id for s in plan.stages}) == plan.pp == len(plan.stages)
    for s in plan.stages:
        device = next(d for d in by_id[s.node_id].devices if d.device_id == s.device_id)
        assert device.free_bytes >= s.memory_bytes, (device, s)
        if s.fetch_bytes:  # joining this link keeps every existing fetch on time
            assert by_id[s.node_id].link.admits_one_more(), s.node_id
    if plan.slo_met:
        assert plan.predicted_ttft_s <= req.ttft_slo_s + 1e-9
        assert plan.predicted_tpot_s <= req.tpot_slo_s + 1e-9
    assert plan.stages[0].full_share or plan.num_full == 0  # stage 0 first gets a full share


@settings(max_examples=200, deadline=None)
@given(req=requests_st, nodes=nodes_st)
def test_smallest_feasible_pipeline_is_chosen(req, nodes):
    one = Request(**{f: getattr(req, f) for f in Request.__slots__} | {"demand": 1})
    plan = plan_cold_start(one, nodes, CFG)
    if plan is None or not plan.slo_met or plan.stages[0].fetch_bytes == 0:
        return
    for smaller in range(1, plan.pp):
        narrower = PlannerConfig(CFG.init_overhead_s, CFG.hop_s, CFG.kv_reserve_fraction, smaller)
        other = plan_cold_start(one, nodes, narrower)
        assert other is None or not other.slo_met, (smaller, other)


def test_the_baseline_policies_plan_one_whole_model_and_sequential_ignores_the_caches():
    from hydraserve.scheduler.policies import planner_config

    nodes = [node(n) for n in "abcd"]
    assert plan_cold_start(request(ttft_slo_s=7.5), nodes, planner_config("hydra", CFG)).pp == 4
    pp1 = plan_cold_start(request(ttft_slo_s=7.5), nodes, planner_config("pp1", CFG))
    assert pp1.pp == 1 and not pp1.slo_met  # the closest it has: one stage over one link
    cached = [node("a", mbps=1000), node("b", mbps=10, cached=[7])]
    assert plan_cold_start(request(ttft_slo_s=5), cached,
                           planner_config("pp1", CFG)).stages[0].fetch_bytes == 0
    fresh = plan_cold_start(request(ttft_slo_s=5), cached, planner_config("sequential", CFG))
    assert fresh.pp == 1 and fresh.stages[0].node_id == "a" and fresh.stages[0].fetch_bytes > 0
    with pytest.raises(ValueError, match="unknown scheduler policy"):
        planner_config("fastest", CFG)


# ---- waiting for a worker to boot ------------------------------------------------------------

def booting(name: str, wait_s: float, **kw) -> NodeState:
    """A node whose pre-started workers are all taken: a stage there waits ``wait_s``."""
    from dataclasses import replace

    return replace(node(name, **kw), boot_wait_s=wait_s)


def test_a_stage_goes_where_a_booted_worker_is_idle_when_that_starts_sooner():
    req = request()  # 2 GB: 2 s over 1000 MB/s, 4 s over 500 MB/s
    fast_busy, slow_idle = booting("fast", 10.0, mbps=1000), node("slow", mbps=500)
    plan = plan_cold_start(req, [fast_busy, slow_idle], CFG)
    assert [s.node_id for s in plan.stages] == ["slow"] and plan.boot_wait_s == 0
    assert plan.predicted_ttft_s == pytest.approx(4 + 0.3 + 1.0)
    # a boot shorter than the fetch is hidden behind it: the faster link wins again
    plan = plan_cold_start(req, [booting("fast", 1.5, mbps=1000), slow_idle], CFG)
    assert [s.node_id for s in plan.stages] == ["fast"] and plan.boot_wait_s == 0
    assert plan.predicted_ttft_s == pytest.approx(2 + 0.3 + 1.0)


def test_only_waiting_nodes_put_the_boot_into_the_prediction_and_the_reason():
    plan = plan_cold_start(request(), [booting("a", 10.0, mbps=1000)], CFG)
    # the 2 s fetch hides 2 s of the boot: 8 s of waiting are left
    assert plan.boot_wait_s == pytest.approx(8.0) and plan.slo_met and plan.waits_for_boot
    assert plan.predicted_ttft_s == pytest.approx(10 + 0.3 + 1.0)
    assert "waits about 8.0 s past its fetch for a worker to boot" in plan.reason
    # against a TTFT SLO the boot breaks, the plan is the closest miss
    late = plan_cold_start(request(ttft_slo_s=8.0), [booting("a", 10.0, mbps=1000)], CFG)
    assert late is not None and not late.slo_met


def test_demand_for_full_shares_does_not_wait_for_a_boot_when_fewer_start_at_once():
    """The node-agent case of the chaos suite: two full shares asked for, three nodes left,
    only one with a booted worker: one full share now, not two after a boot."""
    req = request(model_bytes=GB // 10, demand=2)
    nodes = [node("c", mbps=500), booting("a", 10.0, mbps=1000), booting("b", 10.0, mbps=1000)]
    plan = plan_cold_start(req, nodes, CFG)
    assert plan.pp == 1 and [s.node_id for s in plan.stages] == ["c"]
    assert plan.boot_wait_s == 0 and plan.slo_met
    # with a booted worker on two nodes the demand gets both full shares, as before
    nodes[1] = node("a", mbps=1000)
    plan = plan_cold_start(req, nodes, CFG)
    assert plan.num_full == 2 and plan.boot_wait_s == 0


def test_a_cached_start_that_waits_for_a_boot_yields_to_a_fetch_that_does_not():
    req = request(model_bytes=GB // 10)  # 0.2 s over 500 MB/s; both would meet the SLO
    holder = booting("holder", 10.0, cached=(7,))
    plan = plan_cold_start(req, [holder, node("idle", mbps=500)], CFG)
    assert [s.node_id for s in plan.stages] == ["idle"] and plan.stages[0].fetch_bytes > 0
    # while no other node could take it, the cached start is still taken (it waits the boot)
    plan = plan_cold_start(req, [holder], CFG)
    assert [s.fetch_bytes for s in plan.stages] == [0] and plan.boot_wait_s == 10.0
    assert plan.slo_met


def test_a_boot_of_a_forked_worker_is_no_wait_worth_avoiding():
    """A worker forked from the node's fork server boots in tens of milliseconds: a cached
    start on a node whose booted worker is taken is still taken, not a fetch elsewhere."""
    req = request(model_bytes=GB // 10)
    plan = plan_cold_start(req, [booting("holder", 0.05, cached=(7,)), node("idle", mbps=500)],
                           CFG)
    assert [(s.node_id, s.fetch_bytes) for s in plan.stages] == [("holder", 0)]
    assert plan.boot_wait_s == 0.05 and not plan.waits_for_boot


def test_the_sequential_baseline_counts_no_boot_wait_it_never_escapes():
    """Every sequential start is a fresh process: the nodes' pre-started workers, taken or
    not, do not change where its stage goes (the faster link wins)."""
    from hydraserve.scheduler.policies import planner_config

    nodes = [booting("fast", 10.0, mbps=1000), node("slow", mbps=500)]
    assert plan_cold_start(request(), nodes, planner_config("pp1", CFG)).stages[0].node_id == "slow"
    fresh = plan_cold_start(request(), nodes, planner_config("sequential", CFG))
    assert fresh.stages[0].node_id == "fast" and fresh.boot_wait_s == 0
