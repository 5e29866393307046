"""The worker pool across real processes: a pre-started worker takes a stage, a new process is
started when none is free, a pp=2 ring over the channel generates what the plain engine does,
the timeline is ordered, and worker-side failures come back typed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpu_runtime.coldstart import (
    AssignmentError,
    ColdStartGroup,
    WorkerFailedError,
    WorkerPool,
    WorkerPoolConfig,
    launch_stage,
    plan_group,
)
from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.sampling import SamplingParams
from gpu_runtime.store import LinkConfig

REQUESTS = [("a", [1, 5, 9, 33, 7]), ("b", [2, 4, 8, 16, 32, 64])]


def plain_tokens(model_dir) -> dict[str, list[int]]:
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=4 << 20))
    for rid, prompt in REQUESTS:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    out: dict[str, list[int]] = {rid: [] for rid, _ in REQUESTS}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return out


@pytest.fixture
def pools():
    made: list[WorkerPool] = []

    def make(**kwargs) -> WorkerPool:
        pool = WorkerPool(WorkerPoolConfig(num_threads=1, **kwargs))
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close(10)


def test_prestarted_worker_takes_a_stage_and_a_new_one_is_spawned_when_none_is_free(
        pools, make_prefetcher, cs_server, cs_index, cs_root):
    node0 = pools(node_id="n0", num_prestarted=1, refill=True)
    node1 = pools(node_id="n1", num_prestarted=0)
    [prestarted_pid] = node0.wait_booted(120)
    plans = plan_group("llama", cs_index["llama"], 2, kv_cache_bytes=4 << 20, num_threads=1)
    # a capped link keeps the fetch running while the spawned worker boots
    nodes = [(make_prefetcher(link=LinkConfig(bandwidth_mb_s=8)), node0),
             (make_prefetcher(link=LinkConfig(bandwidth_mb_s=8)), node1)]
    group = ColdStartGroup(nodes, plans)
    try:
        s0, s1 = (s.handle for s in group.stages)
        assert (s0.prestarted, s0.pid) == (True, prestarted_pid)
        assert not s1.prestarted and s1.pid != prestarted_pid
        assert node0.num_idle == 1 and node1.num_idle == 0  # node0 refilled, node1 keeps none
        reports = group.wait_ready(120)
        assert [r["stage"] for r in reports] == [0, 1]
        assert all(r["load"]["aliased_bytes"] == r["load"]["num_bytes"] > 0 for r in reports)
        result = group.generate([(rid, p, SamplingParams(max_tokens=6, ignore_eos=True))
                                 for rid, p in REQUESTS], 120)
        assert result["outputs"] == plain_tokens(cs_root / "llama")
        timeline = group.timeline().check()
        st0, st1 = timeline.stages
        assert st0.prestarted and not st1.prestarted
        assert st0.fetch_start <= st0.init_start  # handed over after the prefetch started
        assert st1.init_start < st1.fetch_end  # the new process booted during the fetch
        assert st0.first_token > st0.ready >= st1.ready >= st1.load_end >= st1.fetch_start
        assert timeline.ttft is not None and 0 < timeline.ttft < 120
        assert [s.fetch_bytes for s in timeline.stages] == [p.fetch_bytes for p in plans]
    finally:
        group.stop(20)
    # the refilled worker serves the next stage; a fetch from a wrong URI fails loudly there
    bad = plan_group("llama", cs_index["llama"], 1, uri=f"{cs_server.url}/missing")[0]
    launched = launch_stage(make_prefetcher(), node0, bad)
    assert launched.handle.prestarted
    with pytest.raises(WorkerFailedError, match="missing") as info:
        launched.wait_ready(60)
    assert info.value.remote_type == "FetchFailedError"
    launched.stop(5)


def test_pool_config_is_validated(cs_index):
    with pytest.raises(AssignmentError, match="device 'gpu'"):
        WorkerPoolConfig(device="gpu")
    with pytest.raises(AssignmentError, match="device 'cuda:x'"):
        WorkerPoolConfig(devices=("cpu:0", "cuda:x"))
    config = WorkerPoolConfig(num_prestarted=3, devices=("cuda:0", "cuda:1"))
    assert [config.boot_device(k) for k in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert WorkerPoolConfig(devices=("cpu:0", "cpu:1")).boot_device(1) == "cpu"
    with pytest.raises(AssignmentError, match="device 'tpu:0'"):
        replace(plan_group("llama", cs_index["llama"], 1)[0], device="tpu:0")
    with pytest.raises(AssignmentError, match="start_method='fork'; allowed auto, forkserver, "
                       "spawn"):
        WorkerPoolConfig(start_method="fork")
    # the fork server on CPU nodes; spawn where CUDA is named, until a GPU run has checked it
    assert WorkerPoolConfig(devices=("cpu:0", "cpu:1")).method == "forkserver"
    assert WorkerPoolConfig(devices=("cpu:0", "cuda:0")).method == "spawn"
    assert WorkerPoolConfig(device="cuda").method == "spawn"
    assert WorkerPoolConfig(device="cuda", start_method="forkserver").method == "forkserver"


def test_each_stage_runs_on_the_device_its_plan_names(pools, make_prefetcher, cs_index):
    """A node with two CPU devices: a stage planned on cpu:1 is pinned to the second slice of
    the cores and cpu:0 to the first, on a pre-started (unbound) worker as on a new one, and
    the pipeline still generates; each worker reports the device it was bound to."""
    import os

    from gpu_runtime.devices import cpu_slice

    devices = ("cpu:0", "cpu:1")
    node0 = pools(node_id="d0", num_prestarted=1, refill=False, devices=devices)
    node1 = pools(node_id="d1", num_prestarted=0, devices=devices)
    node0.wait_booted(120)
    plans = plan_group("llama", cs_index["llama"], 2, kv_cache_bytes=4 << 20, num_threads=1)
    plans = [replace(plans[0], device="cpu:1"), replace(plans[1], device="cpu:0")]
    group = ColdStartGroup([(make_prefetcher(), node0), (make_prefetcher(), node1)], plans)
    try:
        reports = group.wait_ready(120)
        assert [r["device"]["device"] for r in reports] == ["cpu:1", "cpu:0"]
        for r, index in zip(reports, (1, 0), strict=True):
            assert r["device"]["cores"] == cpu_slice(index, 2)
            assert r["device"]["threads"] == 1  # the pool's num_threads wins over the slice
        if len(os.sched_getaffinity(0)) >= 2:  # two slices that do not overlap
            assert not set(reports[0]["device"]["cores"]) & set(reports[1]["device"]["cores"])
        result = group.generate([("a", [1, 5, 9], SamplingParams(max_tokens=4,
                                                                 ignore_eos=True))], 120)
        assert len(result["outputs"]["a"]) == 4
    finally:
        group.stop(20)
    with pytest.raises(AssignmentError, match="num_prestarted=-1"):
        WorkerPoolConfig(num_prestarted=-1)




def test_preload_and_prepare_hooks_run_before_and_during_the_load(
        pools, make_prefetcher, cs_index, tmp_path):
    """What a caller's stage server needs is imported at boot (``preload``) and set up in a
    thread while the weights arrive (``prepare``), off the cold start's critical path."""
    import json
    import time
    from dataclasses import replace

    from tests.gpu_runtime.coldstart.hooks import RecordingServer

    pool = pools(node_id="hk", num_prestarted=1, refill=False, preload=(RecordingServer,))
    [pid] = pool.wait_booted(120)
    out = tmp_path / "served.json"
    plan = replace(plan_group("llama", cs_index["llama"], 1, kv_cache_bytes=4 << 20,
                              num_threads=1)[0],
                   server=RecordingServer(str(out)))
    assigned = time.time()
    launched = launch_stage(make_prefetcher(link=LinkConfig(bandwidth_mb_s=8)), pool, plan)
    try:
        report = launched.wait_ready(120)
        launched.handle.wait_stopped(60)  # the stage server returns after one request
        got = json.loads(out.read_text())
    finally:
        launched.stop(20)
    assert got["pid"] == pid and got["imported_at"] < assigned  # imported at boot
    assert got["prepared"]["thread"] == "prepare" and got["prepared"]["pid"] == pid
    assert got["prepared"]["started"] < report["load_end"]  # it overlapped the load
    assert len(got["tokens"]) == 3


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_worker_runs_with_the_environment_the_pool_had_when_it_started_it(
        pools, make_prefetcher, cs_index, tmp_path, monkeypatch, start_method):
    """Workers fork from a fork server that imported torch once, with the environment of when
    it started: each still runs with the one its pool had when it started that worker, as a
    spawned one does (fault injection and settings are read from it)."""
    import json
    from dataclasses import replace

    from tests.gpu_runtime.coldstart.hooks import RecordingServer

    first = pools(node_id="env0", num_prestarted=1, refill=False)
    first.wait_booted(120)  # the fork server is up
    assert first.boot_s is None  # a first worker's boot includes the server's: not counted
    monkeypatch.setenv("HYDRA_TEST_MARK", f"set later ({start_method})")
    pool = pools(node_id="env1", num_prestarted=1, refill=True, start_method=start_method)
    [pid] = pool.wait_booted(120)
    out = tmp_path / "served.json"
    plan = replace(plan_group("llama", cs_index["llama"], 1, kv_cache_bytes=4 << 20,
                              num_threads=1)[0], server=RecordingServer(str(out)))
    launched = launch_stage(make_prefetcher(), pool, plan)
    try:
        launched.wait_ready(120)
        launched.handle.wait_stopped(60)
        got = json.loads(out.read_text())
    finally:
        launched.stop(20)
    assert got["pid"] == pid and got["prepared"]["env"] == f"set later ({start_method})"
    assert len(got["tokens"]) == 3
    pool.wait_booted(120)  # the replacement the pool started when the stage took its worker
    assert pool.boot_s is not None and pool.boot_s > 0  # a boot a later stage would wait for


def test_a_failing_prepare_hook_fails_the_stage_with_its_error(pools, make_prefetcher, cs_index,
                                                               tmp_path):
    from dataclasses import replace

    from tests.gpu_runtime.coldstart.hooks import RecordingServer

    pool = pools(node_id="hf", num_prestarted=0)
    plan = replace(plan_group("llama", cs_index["llama"], 1, kv_cache_bytes=4 << 20,
                              num_threads=1)[0],
                   server=RecordingServer(str(tmp_path / "never.json"), fail=True))
    launched = launch_stage(make_prefetcher(), pool, plan)
    try:
        with pytest.raises(WorkerFailedError, match="failed on purpose") as info:
            launched.handle.wait_stopped(120)
        assert info.value.remote_type == "RuntimeError"
        assert not (tmp_path / "never.json").exists()
    finally:
        launched.stop(20)


def test_the_pool_answers_while_its_workers_boot(pools):
    """``wait_booted`` does not hold the pool through a boot (seconds of imports): the node
    agent's heartbeat reads ``num_booted`` meanwhile and must not wait for it."""
    import threading
    import time

    spawned = time.time()
    pool = pools(node_id="wb", num_prestarted=1, refill=False, start_method="spawn")
    booted: list[int] = []
    waiter = threading.Thread(target=lambda: booted.extend(pool.wait_booted(120)))
    waiter.start()
    time.sleep(0.2)  # wait_booted is polling the booting worker now
    started = time.monotonic()
    assert pool.num_booted in (0, 1)
    took = time.monotonic() - started
    waiter.join(120)
    assert took < 0.5, f"num_booted waited {took:.2f} s for the boot"
    assert len(booted) == 1 and pool.num_booted == 1
    # the boot it measured (what a stage waits where no booted worker is idle) is the
    # worker's own spawn-to-report time: no longer than the wait seen from here
    assert pool.boot_s is not None and 0 < pool.boot_s <= time.time() - spawned
