"""Devices end to end on a real cluster: nodes started with two CPU devices each (two slices of
their cores), a plan that places a stage on the second device, and workers that report running
on exactly the device their plan named, pinned to that device's cores."""

from __future__ import annotations

import pytest
import requests

from gpu_runtime.devices import cpu_slice
from tests.e2e.serving_cluster import HEADERS, Cluster, reference_tokens, running_cluster

PROMPT = [1, 5, 9, 13, 200, 31]


@pytest.fixture(scope="module")
def cluster(store_root, tmp_path_factory):
    with running_cluster(store_root, tmp_path_factory, "dev",
                         spec={"num_nodes": 2, "devices": "cpu:2"}) as c:
        yield c


def live_instances(cluster: Cluster) -> list[dict]:
    resp = requests.get(f"{cluster.base}/v1/admin/instances", headers=HEADERS, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


def test_every_stage_runs_on_the_device_its_plan_named(cluster: Cluster, store_root):
    (count,) = cluster.query("SELECT count(*) FROM devices")
    assert count[0] == 4  # two nodes, two CPU devices each
    cluster.register("tiny", store_root / "llama-tiny")
    cluster.register("small", store_root / "llama-small")  # 16 MB: two stages of 12 MiB
    first = cluster.invoke("tiny", {"prompt_ids": PROMPT, "max_tokens": 4}).json()
    assert first["status"] == "succeeded", first.get("error")
    # the node that holds tiny on one device puts its stage of small on the other
    second = cluster.invoke("small", {"prompt_ids": PROMPT, "max_tokens": 6}).json()
    assert second["status"] == "succeeded" and second["group"]["pp"] == 2, second
    assert second["output"]["token_ids"] == reference_tokens(store_root / "llama-small",
                                                             PROMPT, 6)
    instances = live_instances(cluster)
    assert len(instances) == 3, instances
    planned = {(i["node_id"], i["device"]) for i in instances}
    assert len(planned) == 3  # no two workers share a device
    assert "cpu:1" in {i["device"] for i in instances}
    planned_rows = {(r.id, r.node_id, r.index) for r in cluster.query(
        "SELECT i.id, i.node_id, d.index FROM instances i JOIN devices d ON d.id = i.device_id"
        " WHERE i.status = 'ready'")}
    for i in instances:
        assert (i["id"], i["node_id"], int(i["device"].split(":")[1])) in planned_rows
        runs_on = i["runs_on"]
        assert runs_on is not None and runs_on["device"] == i["device"], i
        assert runs_on["cores"] == cpu_slice(int(i["device"].split(":")[1]), 2), i
        memory = i["memory"]  # what the share holds, as the worker allocated it
        assert memory["share"] == i["memory_bytes"] and memory["weights"] > 0, i
        assert memory["kv"] > 0 and memory["workspace"] > 0
        assert memory["workspace_measured"] is None  # no allocator statistics on CPU
