"""The baseline policies on a real local cluster (scheduler/policies.py): under
``sequential`` a cold start downloads the whole checkpoint over the node's link, then a fresh
process loads it, then it serves, with nothing kept for the next start; its answers are the
same tokens as under ``hydra``."""

from __future__ import annotations

import pytest

from tests.e2e.serving_cluster import Cluster, reference_tokens, running_cluster

PROMPT = [1, 5, 9, 13, 200, 31]


@pytest.fixture(scope="module")
def cluster(store_root, tmp_path_factory):
    with running_cluster(store_root, tmp_path_factory, "seq", policy="sequential") as c:
        yield c


def test_a_sequential_cold_start_fetches_all_then_loads_then_serves(cluster: Cluster,
                                                                   store_root):
    cluster.register("seq", store_root / "llama-tiny", keep_alive_s=1)
    expected = reference_tokens(store_root / "llama-tiny", PROMPT, 6)
    first = cluster.invoke("seq", {"prompt_ids": PROMPT, "max_tokens": 6}).json()
    assert first["status"] == "succeeded" and first["cold"] is True, first
    assert first["output"]["token_ids"] == expected
    assert "fetch" in first["timings"]["breakdown_ms"]
    (plan,) = cluster.query("SELECT p.policy, p.pp FROM plans p JOIN instances i"
                            " ON i.plan_id = p.id WHERE i.id = :id",
                            id=first["instance_ids"][0])
    assert (plan.policy, plan.pp) == ("sequential", 1)
    (inst,) = cluster.query("SELECT timeline FROM instances WHERE id = :id",
                            id=first["instance_ids"][0])
    t = inst.timeline
    assert t["fetch_bytes"] > 0 and t["cache_hit"] is False and t["prestarted"] is False
    assert t["fetch_start"] < t["fetch_end"] <= t["init_start"] <= t["ready"]  # one after another
    cluster.wait_for(lambda: not cluster.query(
        "SELECT id FROM instances WHERE status IN ('starting', 'ready', 'stopping')"), 60,
        "the group to scale to zero")
    again = cluster.invoke("seq", {"prompt_ids": PROMPT, "max_tokens": 6}).json()
    assert again["cold"] is True and again["output"]["token_ids"] == expected
    (inst,) = cluster.query("SELECT timeline FROM instances WHERE id = :id",
                            id=again["instance_ids"][0])
    assert inst.timeline["fetch_bytes"] == t["fetch_bytes"]  # fetched again: nothing cached
