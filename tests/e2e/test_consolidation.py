"""Consolidation through the whole platform (real processes): a pipeline cold start whose stage 0
holds a full share turns into a standalone replica while a stream of requests runs through it.
The scheduler records the decision, stage 0's node fetches the other stage's bytes at
background priority, the worker loads them beside the running pipeline, migrates the KV of the
requests in flight and switches; the other stages are released and their usage records close. Every
request gives the tokens of the model run alone, and no stream repeats a token."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import requests

from tests.e2e.serving_cluster import HEADERS, Cluster, reference_tokens, running_cluster

LINK_MBPS = 40.0  # 5 MB/s per node: llama-small (16 MB) over one link misses the TTFT SLO
DEVICE = "64MiB"  # a full share of llama-small fits one device
PROMPTS = [[1, 5, 9, 13, 200, 31], [1, 400, 17, 3], [2, 7, 1, 8, 2, 8, 1, 8]]
MAX_TOKENS = 48


HOLD_S = 3.0  # the rest of the model is held back this long: a window to break a group in


@pytest.fixture(scope="module")
def cluster(store_root, tmp_path_factory):
    os.environ["HYDRA_FAULT_CONSOLIDATION_HOLD_S"] = str(HOLD_S)  # the node agents inherit it
    try:
        with running_cluster(store_root, tmp_path_factory, "cons",
                             spec={"link_mbps": LINK_MBPS, "device_mem": DEVICE}) as c:
            yield c
    finally:
        del os.environ["HYDRA_FAULT_CONSOLIDATION_HOLD_S"]


def pipeline_slo(cluster: Cluster, model_bytes: int) -> dict:
    """A TTFT SLO under which the scheduler's planner, fed what it reads now (the nodes'
    snapshot with their measured links and live instances, the measured start overhead and
    hop cost), plans a pipeline whose stage 0 holds a full share, with room above the
    tightest such SLO for the request's own wait before it is planned."""
    from sqlalchemy.orm import Session

    from hydraserve.scheduler import policies, profiles, state
    from hydraserve.scheduler.actions import Profile
    from hydraserve.scheduler.planner import PlannerConfig, Request, plan_cold_start

    with Session(cluster.db) as s:
        nodes = state.nodes_snapshot(s)
        cfg = profiles.planner_config(s, policies.planner_config("hydra", PlannerConfig()))
    prof = Profile()  # a model the cluster has not served yet: the first guesses

    def pipelined(ttft_s: float) -> bool:
        req = Request(-1, model_bytes, ttft_s, 5.0, prof.tpot_s(model_bytes),
                      prof.prefill_s(model_bytes), num_layers=4)
        plan = plan_cold_start(req, nodes, cfg)
        return plan is not None and plan.slo_met and plan.pp > 1 and plan.stages[0].full_share

    window = [t / 10 for t in range(5, 600) if pipelined(t / 10)]
    assert window, "no TTFT SLO plans a pipeline with a full share on this cluster"
    lo, hi = window[0], max(t for t in window if t - window[0] <= 2.0)
    return {"ttft_ms": int((lo + hi) / 2 * 1000), "tpot_ms": 5000}


class Clients:
    """Two clients invoking in a loop, one of them streaming, until stopped."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster, self.name = cluster, name
        self.results: list[dict] = []
        self.streams: list[tuple[list[int], dict]] = []  # (streamed tokens, final invocation)
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._plain, daemon=True),
                        threading.Thread(target=self._streaming, daemon=True)]

    def start(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def _plain(self) -> None:
        i = 0
        while not self.stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            resp = self.cluster.invoke(self.name, {"prompt_ids": prompt, "max_tokens": MAX_TOKENS})
            if resp.status_code != 200:
                self.errors.append(f"{resp.status_code}: {resp.text[:300]}")
            else:
                self.results.append(resp.json() | {"prompt": prompt})
            i += 1

    def _streaming(self) -> None:
        i = 1
        while not self.stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            resp = self.cluster.invoke(self.name, {"prompt_ids": prompt, "max_tokens": MAX_TOKENS},
                                       headers={"Accept": "text/event-stream"}, stream=True)
            events = [json.loads(line[6:]) for line in resp.iter_lines(decode_unicode=True)
                      if line.startswith("data: ")]
            streamed = [t for e in events if e.get("type") == "token" for t in e["token_ids"]]
            final = events[-1] if events else {}
            if final.get("object") != "invocation":
                self.errors.append(f"stream ended without its invocation: {events[-1:]}")
            else:
                self.streams.append((streamed, final | {"prompt": prompt}))
            i += 1

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(300)


def plan_of(cluster: Cluster, name: str, first: bool = False):
    """The function's latest plan (``first``: its first)."""
    rows = cluster.query(
        "SELECT p.* FROM plans p JOIN function_versions v ON v.id = p.function_version_id "
        "JOIN functions f ON f.id = v.function_id WHERE f.name = :n ORDER BY p.id", n=name)
    return (rows[0] if first else rows[-1]) if rows else None


def plan_by_id(cluster: Cluster, plan_id: int):
    return cluster.query("SELECT * FROM plans WHERE id = :p", p=plan_id)[0]


def register(cluster: Cluster, name: str, model) -> None:
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    fn = cluster.register(name, model, keep_alive_s=120, slo=pipeline_slo(cluster, size))
    assert fn["name"] == name


def check_outputs(clients: Clients, expected: dict) -> None:
    """Every request gave the model's own tokens, and no stream repeated one."""
    assert not clients.errors, clients.errors[:3]
    assert clients.results and clients.streams
    for r in clients.results:
        assert r["status"] == "succeeded", r
        assert r["output"]["token_ids"] == expected[tuple(r["prompt"])], r["id"]
    for streamed, final in clients.streams:
        assert final["status"] == "succeeded", final
        assert streamed == final["output"]["token_ids"] == expected[tuple(final["prompt"])]


def test_a_pipeline_consolidates_while_serving(cluster: Cluster, store_root):
    model = store_root / "llama-small"
    register(cluster, "cons", model)
    expected = {tuple(p): reference_tokens(model, p, MAX_TOKENS) for p in PROMPTS}
    clients = Clients(cluster, "cons").start()
    try:
        plan = cluster.wait_for(lambda: (p := plan_of(cluster, "cons", first=True)) is not None
                                and p.consolidation_state in ("consolidated", "failed",
                                                              "skipped") and p, 240,
                                "the pipeline to consolidate")
        assert plan.consolidation_state == "consolidated", (plan.consolidation_state,
                                                            plan.consolidation_reason)
        # every later full share stands alone as a replica, with a plan of its own
        replicas = plan.consolidation["replica_stages"]
        plan = cluster.wait_for(lambda: len((p := plan_by_id(cluster, plan.id)).consolidation.get(
            "replica_plans", [])) == len(replicas) and p, 120, "the replicas to stand alone")
        standalone = [i.id for p in (plan.id, *plan.consolidation.get("replica_plans", []))
                      for i in cluster.query("SELECT id FROM instances WHERE plan_id = :p "
                                             "AND stage_index = 0", p=p)]
        # the stream goes on, through every standalone instance
        cluster.wait_for(lambda: all(any(i in r["instance_ids"] for r in clients.results)
                                     for i in standalone), 180,
                         f"requests served by each of {standalone}")
    finally:
        clients.finish()
    assert plan.pp >= 2 and plan.consolidation_target == 1, plan
    stats = plan.consolidation
    assert plan.consolidation_started_at <= plan.consolidated_at
    # the rest came over the stage-0 node's link, then one block per sequence at most moved at
    # the switch while requests were in flight
    fetch = stats["fetch_s0"]
    assert fetch["bytes"] > 0 and fetch["start"] <= fetch["end"], stats
    # from the caches of the nodes that run those stages, not from the store
    assert set(fetch["sources"]) == {f"pp{plan.pp}-s{k}" for k in range(1, plan.pp)}, fetch
    assert all(src.startswith("peer:") for src in fetch["sources"].values()), fetch
    assert stats["switch_sequences"] >= 1, stats
    assert stats["switch_blocks"] <= stats["switch_sequences"], stats
    assert stats["migrated_layers"] >= 1 and stats["precopy_rounds"] >= 0, stats
    check_outputs(clients, expected)

    # stage 0 and the replicas are standalone instances; part shares were released and
    # stopped billing, full shares bill on
    full = {s["stage"]: s["full_share"] for s in plan.stages}
    assert sorted(replicas) == [k for k in range(1, plan.pp) if full[k]], (replicas, full)

    def rows():
        return {r.id: r for p in (plan.id, *stats.get("replica_plans", [])) for r in
                cluster.query("SELECT i.id, i.stage_index, i.num_stages, i.status, "
                              "i.released_at, u.ended_at FROM instances i JOIN usage_records "
                              "u ON u.instance_id = i.id WHERE i.plan_id = :p", p=p)}

    cluster.wait_for(lambda: sum(r.status == "released" for r in rows().values())
                     == plan.pp - 1 - len(replicas), 60, "the part shares' processes to end")
    for r in rows().values():
        if r.id in standalone:
            assert (r.status, r.stage_index, r.num_stages, r.ended_at) == ("ready", 0, 1, None)
        else:
            assert r.status == "released" and r.released_at >= plan.consolidated_at, r
            assert r.ended_at is not None and r.ended_at >= plan.consolidated_at, r

    # the invocation and instance APIs say so
    last = [r for r in clients.results if standalone[0] in r["instance_ids"]][-1]
    got = cluster.get(last["id"])  # served by stage 0 after the switch
    assert got["group"]["plan_id"] == plan.id and got["group"]["pp"] == plan.pp
    assert got["group"]["consolidation"]["state"] == "consolidated"
    assert got["group"]["consolidation"]["target_pp"] == 1
    listed = requests.get(f"{cluster.base}/v1/admin/instances?status=all", headers=HEADERS,
                          timeout=30).json()["data"]
    mine = {i["id"]: i for i in listed if i["id"] in rows()}
    assert all(mine[i]["num_stages"] == 1 and mine[i]["status"] == "ready" for i in standalone)
    assert mine[standalone[0]]["group"]["consolidation"]["stats"]["switch_blocks"] == \
        stats["switch_blocks"]


def test_the_instance_api_names_a_bad_status(cluster: Cluster):
    resp = requests.get(f"{cluster.base}/v1/admin/instances?status=bogus", headers=HEADERS,
                        timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "status"


def test_a_node_killed_mid_consolidation_loses_no_request(cluster: Cluster, store_root):
    """kill -9 the node agent (and so the worker) of a later stage while the group waits for
    the rest of the model: the group breaks as any pipeline would, its consolidation ends
    failed with the cause, and every request still gives the model's own tokens (retried on
    a new group, a stream resumed, never repeated)."""
    copy = store_root / "llama-small-copy"  # another URI: another model, nothing cached
    if not copy.exists():
        copy.mkdir()
        for f in (store_root / "llama-small").iterdir():
            os.link(f, copy / f.name)
    register(cluster, "cons-kill", copy)
    expected = {tuple(p): reference_tokens(copy, p, MAX_TOKENS) for p in PROMPTS}
    clients = Clients(cluster, "cons-kill").start()
    victim = None
    try:
        first = cluster.wait_for(lambda: plan_of(cluster, "cons-kill", first=True), 240,
                                 "a plan")
        assert first.pp > 1 and first.consolidation_target == 1, (first.pp, first.reason,
                                                                   first.consolidation_reason)
        plan = cluster.wait_for(lambda: (p := plan_by_id(cluster, first.id))
                                .consolidation_state == "consolidating" and p, 240,
                                "the pipeline to start consolidating", every_s=0.05)
        (victim,) = cluster.query("SELECT node_id FROM instances WHERE plan_id = :p AND "
                                  "stage_index = 1", p=plan.id)
        agent = int(cluster.layout.pidfile(f"node-{victim.node_id}").read_text())
        os.killpg(agent, signal.SIGKILL)
        failed = cluster.wait_for(lambda: (p := plan_by_id(cluster, plan.id)).consolidation_state
                                  != "consolidating" and p, 60, "the consolidation to end")
        done = len(clients.results)
        cluster.wait_for(lambda: len(clients.results) >= done + 3, 180, "requests after it")
    finally:
        clients.finish()
        if victim is not None:  # the killed agent left its pid file and cache pool behind
            from gpu_runtime.prefetch import PrefetchConfig

            pool = PrefetchConfig(node_id=f"{cluster.settings.queue_prefix}{victim.node_id}")
            cluster.layout.pidfile(f"node-{victim.node_id}").unlink(missing_ok=True)
            Path(pool.pool_path).unlink(missing_ok=True)
    assert failed.consolidation_state == "failed", failed
    assert "broke while consolidating" in failed.consolidation_reason, failed
    check_outputs(clients, expected)
    assert any(r["attempts"] > 1 for r in clients.results + [f for _, f in clients.streams]), \
        "no request was in the broken group"
