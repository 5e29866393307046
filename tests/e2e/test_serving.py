"""Serving through the whole platform: real API, scheduler, node agents, workers, Postgres and
RabbitMQ. Cold and warm, pipeline cold starts, streaming, async, scale to zero, concurrency,
bad input, and a node agent killed during a cold start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import PROMTOOL, promtool_problems
from tests.e2e.serving_cluster import HEADERS, Cluster, reference_tokens, running_cluster

PROMPT = [1, 5, 9, 13, 200, 31]


@pytest.fixture(scope="module")
def cluster(store_root, tmp_path_factory):
    with running_cluster(store_root, tmp_path_factory, "srv") as c:
        yield c


def test_cold_then_warm(cluster: Cluster, store_root):
    cluster.register("chat", store_root / "llama-tiny")
    expected = reference_tokens(store_root / "llama-tiny", PROMPT, 8)
    first = cluster.invoke("chat", {"prompt_ids": PROMPT, "max_tokens": 8})
    assert first.status_code == 200, first.text
    cold = first.json()
    assert cold["status"] == "succeeded" and cold["cold"] is True
    assert cold["output"]["token_ids"] == expected
    assert (cold["tokens_in"], cold["tokens_out"]) == (len(PROMPT), len(expected))
    assert set(cold["timings"]["breakdown_ms"]) >= {"plan", "fetch", "load", "first_token"}
    assert cold["timings"]["ttft_ms"] > 0
    warm = cluster.invoke("chat", {"prompt_ids": PROMPT, "max_tokens": 8}).json()
    assert warm["cold"] is False and warm["instance_ids"] == cold["instance_ids"]
    assert warm["output"]["token_ids"] == expected
    assert warm["timings"]["ttft_ms"] < cold["timings"]["ttft_ms"]
    # the node then starts a replacement for the pre-started worker the cold start took, and
    # reports how long its boot took: what the planner counts for a stage placed where no
    # booted worker is idle (the first workers' boots, which started the fork server, do not)
    (node_id,) = cluster.query("SELECT node_id FROM instances WHERE id = :i",
                               i=cold["instance_ids"][0])[0]
    cluster.wait_for(lambda: (cluster.query("SELECT info FROM nodes WHERE id = :n",
                                            n=node_id)[0][0].get("boot_s") or 0) > 0, 60,
                     f"node {node_id}'s heartbeat to report a replacement's boot")


def test_pipeline_cold_start_across_nodes(cluster: Cluster, store_root):
    cluster.register("big", store_root / "llama-small")
    expected = reference_tokens(store_root / "llama-small", PROMPT, 6)
    resp = cluster.invoke("big", {"prompt_ids": PROMPT, "max_tokens": 6})
    assert resp.status_code == 200, resp.text
    inv = resp.json()
    assert inv["cold"] is True and len(inv["instance_ids"]) == 2
    assert inv["output"]["token_ids"] == expected
    nodes = cluster.query("SELECT node_id FROM instances WHERE id = ANY(:ids)",
                          ids=inv["instance_ids"])
    assert len({n for (n,) in nodes}) == 2, nodes  # each stage on its own node
    (pp,) = cluster.query("SELECT pp FROM plans p JOIN instances i ON i.plan_id = p.id "
                          "WHERE i.id = :i", i=inv["instance_ids"][0])[0]
    assert pp == 2


def test_sse_stream(cluster: Cluster, store_root):
    cluster.register("stream", store_root / "opt-tiny")
    expected = reference_tokens(store_root / "opt-tiny", PROMPT, 5)
    resp = cluster.invoke("stream", {"prompt_ids": PROMPT, "max_tokens": 5},
                          headers={"Accept": "text/event-stream"}, stream=True)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events, comments = [], 0
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith(":"):
            comments += 1
        elif line.startswith("data: "):
            events.append(json.loads(line[6:]))
    tokens = [t for e in events if e.get("type") == "token" for t in e["token_ids"]]
    assert tokens == expected
    assert events[-1]["object"] == "invocation" and events[-1]["status"] == "succeeded"
    assert comments >= 1  # the accepted comment, then keep-alives during the cold start


def sse_events(resp) -> list[dict]:
    return [json.loads(line[6:]) for line in resp.iter_lines(decode_unicode=True)
            if line.startswith("data: ")]


def test_a_stop_string_is_never_partly_streamed(cluster: Cluster, store_root):
    cluster.register("stops", store_root / "llama-tiny")
    body = {"prompt": "Hello, world! How are you today?", "max_tokens": 24}
    full = cluster.invoke("stops", body).json()["output"]["text"]
    printable = [i for i in range(2, len(full) - 3) if full[i:i + 3].isprintable()]
    assert printable, f"no printable stretch in {full!r}"
    stop = full[printable[len(printable) // 2]:][:3]
    resp = cluster.invoke("stops", body | {"stop": [stop]},
                          headers={"Accept": "text/event-stream"}, stream=True)
    events = sse_events(resp)
    streamed = "".join(e["text"] for e in events if e.get("type") == "token")
    final = events[-1]
    assert final["status"] == "succeeded" and final["output"]["finish_reason"] == "stop"
    assert final["output"]["text"] == full[:full.index(stop)]
    assert streamed == final["output"]["text"]  # nothing of the stop string went out


def test_client_disconnect_cancels_the_stream(cluster: Cluster, store_root):
    cluster.register("chatty", store_root / "llama-tiny")
    cluster.invoke("chatty", {"prompt_ids": PROMPT, "max_tokens": 1})  # warm it up
    resp = cluster.invoke("chatty", {"prompt_ids": PROMPT, "max_tokens": 4000},
                          headers={"Accept": "text/event-stream"}, stream=True)
    inv_id = resp.headers["X-Invocation-Id"]
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event: token"):
            break
    resp.close()  # the client goes away mid-generation
    final = cluster.wait_for(lambda: (i := cluster.get(inv_id))["status"] != "running" and i,
                             60, "the cancel")
    assert final["status"] == "cancelled", final["status"]
    quick = cluster.invoke("chatty", {"prompt_ids": PROMPT, "max_tokens": 2}, timeout_s=60)
    assert quick.status_code == 200 and quick.json()["status"] == "succeeded"


def test_async_then_poll(cluster: Cluster, store_root):
    cluster.register("later", store_root / "llama-tiny")
    resp = cluster.invoke("later", {"prompt_ids": PROMPT, "max_tokens": 3},
                          headers={"Prefer": "respond-async"})
    assert resp.status_code == 202 and resp.headers["Location"].startswith("/v1/invocations/")
    inv_id = resp.json()["id"]
    done = cluster.wait_for(lambda: (i := cluster.get(inv_id))["status"] == "succeeded" and i,
                            180, "the async invocation")
    assert len(done["output"]["token_ids"]) == 3


@pytest.mark.parametrize("body,status,fragment", [
    ({"prompt_ids": [1] * 600, "max_tokens": 4}, 400, "prompt has 600 tokens"),
    ({"prompt_ids": [1, 99999], "max_tokens": 4}, 400, "outside the vocabulary"),
    ({"max_tokens": 4}, 400, "exactly one of prompt"),
    ({"prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
])
def test_bad_invocations(cluster: Cluster, store_root, body, status, fragment):
    cluster.register("strict", store_root / "llama-tiny") if not cluster.query(
        "SELECT 1 FROM functions WHERE name = 'strict'") else None
    resp = cluster.invoke("strict", body)
    assert resp.status_code == status, resp.text
    assert fragment in resp.json()["error"]["message"]


def test_a_generated_nul_is_stored_and_answered_and_kills_nothing(cluster: Cluster, store_root):
    # greedy "hi" on this model emits a token that decodes to U+0000, which Postgres jsonb
    # refuses: the record used to crash the worker, three times, then fail the request
    cluster.register("nul", store_root / "llama-tiny")
    resp = cluster.invoke("nul", {"prompt": "hi", "max_tokens": 64})
    assert resp.status_code == 200, resp.text
    inv = resp.json()
    assert (inv["status"], inv["attempts"]) == ("succeeded", 1)
    assert "\x00" in inv["output"]["text"]
    assert cluster.get(inv["id"])["output"]["text"] == inv["output"]["text"]  # read from the row
    again = cluster.invoke("nul", {"prompt_ids": PROMPT, "max_tokens": 4}).json()
    assert again["status"] == "succeeded" and again["instance_ids"] == inv["instance_ids"]


def test_messages_to_a_model_without_a_chat_template_fail_alone(cluster: Cluster,
                                                                  no_template_model):
    from sqlalchemy.orm import Session

    from hydraserve.broker import Publisher
    from hydraserve.functions.service import get_target
    from hydraserve.invocations import service as invocations
    from hydraserve.invocations.schemas import InvokeRequest
    from hydraserve.tenants.service import authenticate
    from tests.conftest import ADMIN_KEY

    cluster.register("plain", no_template_model)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    resp = cluster.invoke("plain", chat)
    assert resp.status_code == 400, resp.text  # the API answers before queueing
    assert "no chat_template" in resp.json()["error"]["message"]
    warm = cluster.invoke("plain", {"prompt": "hi", "max_tokens": 4}).json()
    assert warm["status"] == "succeeded"
    # one that reaches the worker anyway (queued past the API's check) fails there, alone
    with Session(cluster.db) as s:
        inv = invocations.accept(
            s, Publisher(cluster.settings.broker_url), authenticate(s, ADMIN_KEY),
            get_target(s, authenticate(s, ADMIN_KEY), "plain"), InvokeRequest(**chat), "invoke",
            invocations.new_id(), None, cluster.settings.queue_prefix)
    row = cluster.wait_for(lambda: next(iter(cluster.query(
        "SELECT status, attempts, error, instance_ids FROM invocations WHERE id = :id "
        "AND status = 'failed'", id=inv.id)), None), 60, "the poisoned request to fail")
    assert row.attempts == 1 and "no chat_template" in row.error["message"]
    assert row.instance_ids == warm["instance_ids"]
    ok = cluster.invoke("plain", {"prompt": "hi", "max_tokens": 4}).json()
    assert ok["status"] == "succeeded" and ok["instance_ids"] == warm["instance_ids"]


def test_a_checkpoint_that_cannot_load_is_marked_unservable_and_its_requests_fail_fast(
        cluster: Cluster, store_root, tmp_path):
    """Bytes that changed after registration fail their checksums on the node: the start is
    retried with back-off, then the version is marked unservable and the waiting request fails
    with that cause (instead of waiting out HYDRA_MAX_QUEUE_S), and new ones are refused."""
    broken = store_root / "llama-changed"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(store_root / "llama-tiny", broken)
    cluster.register("changed", broken)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # the last tensor's bytes, after the index took their sha256
    weights.write_bytes(bytes(data))
    started = time.monotonic()
    inv = cluster.invoke("changed", {"prompt_ids": PROMPT, "max_tokens": 4}, timeout_s=120).json()
    assert inv["status"] == "failed", inv
    assert inv["error"]["type"] == "invalid_model_error", inv["error"]
    assert "cannot start" in inv["error"]["message"], inv["error"]
    assert time.monotonic() - started < 90
    starts = cluster.query(
        "SELECT i.plan_id, i.error, i.timeline FROM instances i JOIN function_versions v"
        " ON v.id = i.function_version_id JOIN functions f ON f.id = v.function_id"
        " WHERE f.name = 'changed' ORDER BY i.id")
    # three starts in a row (a pipeline's stages failing together are one), each instance
    # with its cause
    assert len({r.plan_id for r in starts}) == 3, starts
    assert all(r.error and "start_failed" in r.timeline for r in starts), starts
    again = cluster.invoke("changed", {"prompt_ids": PROMPT, "max_tokens": 4})
    assert again.status_code == 422 and "cannot start" in again.json()["error"]["message"]
    fn = requests.get(f"{cluster.base}/v1/functions/changed", headers=HEADERS, timeout=30).json()
    assert "3 cold starts in a row failed" in fn["spec"]["unservable"]["reason"], fn["spec"]


def test_unknown_function_and_invocation(cluster: Cluster):
    assert cluster.invoke("ghost", {"prompt": "x"}).status_code == 404
    resp = requests.get(f"{cluster.base}/v1/invocations/inv_nope",
                        headers={"Authorization": f"Bearer {cluster.settings.admin_key}"},
                        timeout=10)
    assert resp.status_code == 404


def test_concurrent_invocations_of_several_functions(cluster: Cluster, store_root):
    cluster.register("fa", store_root / "opt-tiny")
    cluster.register("fb", store_root / "llama-tiny")
    jobs = [(name, i) for name in ("fa", "fb") for i in range(6)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(
            lambda job: cluster.invoke(job[0], {"prompt_ids": [1, 2, 3 + job[1]],
                                                "max_tokens": 4}), jobs))
    assert [r.status_code for r in results] == [200] * len(jobs), [r.text for r in results]
    assert all(r.json()["status"] == "succeeded" for r in results)


def test_openai_client_streams_a_chat_from_a_cold_function(cluster: Cluster, store_root):
    import openai

    cluster.register("gpt", store_root / "llama-tiny")
    client = openai.OpenAI(base_url=f"{cluster.base}/v1", api_key=cluster.settings.admin_key)
    assert "gpt" in {m.id for m in client.models.list()}
    stream = client.chat.completions.create(
        model="gpt", messages=[{"role": "user", "content": "Hello, how are you?"}],
        max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True})
    *chunks, last = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert last.choices == [] and all(c.usage is None for c in chunks)  # usage comes last
    assert last.usage.completion_tokens == 8 or chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    (cold, stored) = cluster.query("SELECT cold, output->>'text' FROM invocations i "
                                   "JOIN functions f ON f.id = i.function_id "
                                   "WHERE f.name = 'gpt'")[0]
    assert cold is True and text == stored


def test_openai_completions_match_the_engine(cluster: Cluster, store_root):
    import openai

    cluster.register("complete", store_root / "opt-tiny")
    client = openai.OpenAI(base_url=f"{cluster.base}/v1", api_key=cluster.settings.admin_key)
    done = client.completions.create(model="complete", prompt=PROMPT, max_tokens=4, temperature=0)
    assert done.usage.prompt_tokens == len(PROMPT)
    assert done.usage.completion_tokens == len(reference_tokens(store_root / "opt-tiny", PROMPT, 4))
    assert done.object == "text_completion" and isinstance(done.choices[0].text, str)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="complete", prompt="x", temperature=9)


def test_scale_to_zero_after_keep_alive(cluster: Cluster, store_root):
    cluster.register("brief", store_root / "opt-tiny", keep_alive_s=1)
    first = cluster.invoke("brief", {"prompt_ids": PROMPT, "max_tokens": 2}).json()
    assert first["cold"] is True
    ids = first["instance_ids"]
    cluster.wait_for(lambda: all(s == "released" for (s,) in cluster.query(
        "SELECT status FROM instances WHERE id = ANY(:ids)", ids=ids)), 60, "scale to zero")
    usage = cluster.query("SELECT ended_at - started_at FROM usage_records "
                          "WHERE instance_id = ANY(:ids)", ids=ids)
    assert usage and all(d is not None and d.total_seconds() > 0 for (d,) in usage)
    # the nodes kept its stages in their caches and say so (the group may be a pipeline when
    # earlier tests left the model's stages cached, and that pipeline may have consolidated
    # before it scaled to zero: its instances then stand alone, pp = 1, while the caches keep
    # the pipeline's stages); the next cold start fetches nothing
    rows = cluster.query(
        "SELECT v.model_id, i.node_id FROM instances i JOIN function_versions v ON "
        "v.id = i.function_version_id WHERE i.id = ANY(:ids)", ids=ids)
    for model_id, node_id in rows:
        cluster.wait_for(lambda m=model_id, n=node_id: any(c[0] == m for c in cluster.query(
            "SELECT info FROM nodes WHERE id = :n", n=n)[0][0]["cached_stages"]), 60,
            f"node {node_id}'s heartbeat to report a stage of model {model_id}")
    again = cluster.invoke("brief", {"prompt_ids": PROMPT, "max_tokens": 2}).json()
    assert again["cold"] is True and not set(again["instance_ids"]) & set(ids)
    (reason, stages, timeline), = cluster.query(
        "SELECT p.reason, p.stages, i.timeline FROM instances i JOIN plans p "
        "ON p.id = i.plan_id WHERE i.id = :i", i=again["instance_ids"][0])
    assert "no fetch" in reason, reason
    assert all(s["fetch_bytes"] == 0 for s in stages) and timeline["cache_hit"] is True


def test_node_agent_killed_during_cold_start(cluster: Cluster, store_root):
    cluster.register("fragile", store_root / "opt-tiny")
    resp = cluster.invoke("fragile", {"prompt_ids": PROMPT, "max_tokens": 3},
                          headers={"Prefer": "respond-async"})
    inv_id = resp.json()["id"]
    starting = cluster.wait_for(lambda: cluster.query(
        "SELECT i.id, i.node_id FROM instances i JOIN function_versions v "
        "ON v.id = i.function_version_id JOIN functions f ON f.id = v.function_id "
        "WHERE f.name = 'fragile' AND i.status = 'starting'"), 60, "a starting instance", 0.02)
    instance_id, node_id = starting[0]
    pid = int(cluster.layout.pidfile(f"node-{node_id}").read_text())
    os.killpg(pid, signal.SIGKILL)  # the agent and, through PDEATHSIG, its workers
    final = cluster.wait_for(lambda: (i := cluster.get(inv_id))["status"] in (
        "succeeded", "failed") and i, 120, "the invocation to end")
    # Nothing is lost: it completed on a re-plan, or ended with a recorded error.
    assert final["status"] == "succeeded" or final["error"]["message"], final
    if final["status"] == "succeeded":
        assert instance_id not in final["instance_ids"]
    (status,) = cluster.query("SELECT status FROM instances WHERE id = :i", i=instance_id)[0]
    assert status == "failed"


def test_rabbitmq_restart_with_queued_requests_loses_nothing(cluster: Cluster, store_root):
    """Requests sit in a fresh function's queue while the broker restarts; all complete."""
    import subprocess

    cluster.register("durable", store_root / "llama-tiny")
    ids = [cluster.invoke("durable", {"prompt_ids": [1, 2, 3 + i], "max_tokens": 2},
                          headers={"Prefer": "respond-async"}).json()["id"] for i in range(4)]
    for cmd in (["rabbitmqctl", "-q", "stop_app"], ["rabbitmqctl", "-q", "start_app"]):
        subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    done = cluster.wait_for(
        lambda: (got := [cluster.get(i) for i in ids]) and all(
            g["status"] in ("succeeded", "failed") for g in got) and got, 240, "all requests")
    assert [d["status"] for d in done] == ["succeeded"] * 4, [d.get("error") for d in done]
    assert all(len(d["output"]["token_ids"]) == 2 for d in done)


def test_node_metrics_count_what_was_served(cluster: Cluster, store_root):
    """Each node agent's /metrics (its workers' samples, vLLM's names): the requests and
    tokens of real invocations, labelled with the function and cold or warm."""
    from prometheus_client.parser import text_string_to_metric_families

    cluster.register("metered", store_root / "llama-tiny")
    outs = [cluster.invoke("metered", {"prompt_ids": PROMPT, "max_tokens": 4}).json()
            for _ in range(3)]
    assert all(o["status"] == "succeeded" for o in outs), outs
    samples: dict[tuple[str, tuple], float] = {}
    node_totals: dict[str, float] = {}
    # the nodes alive (an earlier test of this module kills one)
    for (info,) in cluster.query("SELECT info FROM nodes WHERE status <> 'down'"):
        text = requests.get(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=30).text
        if PROMTOOL:  # installed by make venv; where it is not, the parser below still reads it
            assert promtool_problems(text) == []
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if "node" in s.labels:
                    node_totals[s.name] = node_totals.get(s.name, 0.0) + s.value
                if s.labels.get("model_name") == "metered":
                    key = (s.name, tuple(sorted(s.labels.items())))
                    samples[key] = samples.get(key, 0.0) + s.value

    def total(name: str, **labels) -> float:
        return sum(v for (n, ls), v in samples.items()
                   if n == name and labels.items() <= dict(ls).items())

    assert total("vllm:e2e_request_latency_seconds_count") == 3
    assert total("vllm:time_to_first_token_seconds_count", cold="true") == 1  # the cold start
    assert total("vllm:time_to_first_token_seconds_count", cold="false") == 2
    assert total("vllm:generation_tokens_total") == sum(o["tokens_out"] for o in outs)
    assert total("vllm:prompt_tokens_total") == 3 * len(PROMPT)
    assert total("hydraserve_cold_start_phase_seconds_count", phase="prefill") == 1
    assert total("vllm:num_requests_running") == 0  # all answered
    # the cold start fetched the model over some node's link, into its cache
    weights = sum(f.stat().st_size for f in (store_root / "llama-tiny").glob("*.safetensors"))
    # (the tensors' bytes: a fetch reads tensor ranges, not the files' headers)
    assert node_totals["hydraserve_node_link_bytes_total"] >= 0.95 * weights
    assert node_totals["hydraserve_node_cache_misses_total"] >= 1
    assert node_totals["hydraserve_node_cache_bytes"] > node_totals["hydraserve_node_cache_free_bytes"]
