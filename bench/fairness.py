"""Fair sharing between tenants: a victim tenant's trickle while an aggressor sends 20 times its
rate, through a real local cluster (gunicorn API, scheduler, store, node agents, Postgres,
RabbitMQ). Each tenant has its own warm function of the tiny demo Llama; both send the same
sync invocations, open loop (Poisson arrivals; the aggressor ignores Retry-After).

Side by side in one run: the victim alone (the baseline), then victim and aggressor together,
in ``--rounds`` rounds (3). The key figure is ``victim_p50_vs_alone``, the victim's median
latency under the aggressor over its median alone in the same round, the median over the
rounds (target <= 2.0), with the aggressor's 429 count.

    python bench/fairness.py [--quick] [--json bench/results/fairness.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    KEY,
    environment,
    markdown_table,
    start_cluster,
    stop_cluster,
    write_json,
)
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model  # noqa: E402

PROMPT = [1, 17, 33, 49, 65, 81, 97, 113]
TARGET = 2.0


@dataclass
class Tally:
    """One tenant's answers in one phase."""

    latencies_ms: list[float] = field(default_factory=list)  # of the 200s, at the client
    server_ms: list[float] = field(default_factory=list)  # of the 200s, queued to finished
    statuses: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)  # 429s by the limit they name
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: int, ms: float, refused_by: str | None = None,
            server_ms: float | None = None) -> None:
        with self.lock:
            self.statuses[status] += 1
            if refused_by:
                self.refusals[refused_by] += 1
            if status == 200:
                self.latencies_ms.append(ms)
            if server_ms is not None:
                self.server_ms.append(server_ms)

    def p(self, q: float, xs: list[float] | None = None) -> float:
        xs = sorted(self.latencies_ms if xs is None else xs)
        return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else float("nan")


class Sender:
    """Open-loop Poisson arrivals at ``rate`` per second for ``seconds``, each request on a
    thread of its own pool (so a slow answer never delays the next arrival)."""

    def __init__(self, base: str, key: str, rate: float, seconds: float, max_tokens: int,
                 seed: int, threads: int) -> None:
        # a plain keep-alive HTTP connection per thread, not requests: the clients share the
        # 2 cores with the platform, and requests' own CPU per call slowed everyone's answers
        parsed = urlparse(base)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.path = "/v1/functions/svc/invocations?timeout_s=60"
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.rate, self.seconds, self.max_tokens = rate, seconds, max_tokens
        self.rng = random.Random(seed)
        self.pool = ThreadPoolExecutor(threads)
        self.local = threading.local()
        self.tally = Tally()

    def one(self) -> None:
        if not hasattr(self.local, "conn"):
            self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=90)
        body = json.dumps({"prompt_ids": PROMPT, "max_tokens": self.max_tokens})
        start = time.perf_counter()
        try:
            self.local.conn.request("POST", self.path, body, self.headers)
            resp = self.local.conn.getresponse()
            status, refused_by, server_ms, data = resp.status, None, None, resp.read()
            if status == 200:
                inv = json.loads(data)
                if inv.get("status") != "succeeded":
                    status = 599  # answered, but the invocation did not succeed
                t = inv["timings"]
                server_ms = (datetime.fromisoformat(t["finished_at"])
                             - datetime.fromisoformat(t["queued_at"])).total_seconds() * 1000
            if status == 429:
                refused_by = json.loads(data)["error"]["param"]
        except (OSError, http.client.HTTPException):
            self.local.conn.close()  # reconnects on the next request
            status, refused_by, server_ms = 598, None, None
        self.tally.add(status, (time.perf_counter() - start) * 1000, refused_by, server_ms)

    def run(self) -> Tally:
        t, end = time.perf_counter(), time.perf_counter() + self.seconds
        while True:
            t += self.rng.expovariate(self.rate)
            if t >= end:
                break
            time.sleep(max(0.0, t - time.perf_counter()))
            self.pool.submit(self.one)
        self.pool.shutdown(wait=True)
        return self.tally


def setup_tenants(base: str, model_uri: str) -> dict[str, str]:
    """Tenants victim and aggressor (default limits), each with a warm function "svc"."""
    admin = {"Authorization": f"Bearer {KEY}"}
    keys = {}
    for name in ("victim", "aggressor"):
        requests.post(f"{base}/v1/admin/tenants", json={"name": name}, headers=admin,
                      timeout=30).raise_for_status()
        keys[name] = requests.post(f"{base}/v1/admin/tenants/{name}/keys", json={"name": "b"},
                                   headers=admin, timeout=30).json()["key"]
    for key in keys.values():
        h = {"Authorization": f"Bearer {key}"}
        requests.put(f"{base}/v1/functions/svc", headers=h, timeout=60, json={
            "model": model_uri, "slo": {"ttft_ms": 60000, "tpot_ms": 1000},
            "keep_alive_s": 3600}).raise_for_status()
        for _ in range(6):  # the cold start, then a few warm ones
            r = requests.post(f"{base}/v1/functions/svc/invocations?timeout_s=120", headers=h,
                              json={"prompt_ids": PROMPT, "max_tokens": 2}, timeout=150)
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    return keys


def summary(tally: Tally) -> dict:
    return {"sent": sum(tally.statuses.values()),
            "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
            "refused_by": dict(tally.refusals), "ok": len(tally.latencies_ms),
            "p50_ms": tally.p(0.5), "p99_ms": tally.p(0.99),
            "server_p50_ms": tally.p(0.5, tally.server_ms)}


def aggressor_process(base: str, key: str, rate: float, seconds: float, max_tokens: int,
                      seed: int, out, ready, go) -> None:
    """The aggressor's clients, in a process of their own: in the victim's process their
    hundreds of threads would hold its GIL and slow the victim's client, not the platform."""
    sender = Sender(base, key, rate, seconds, max_tokens, seed, threads=256)
    ready.set()
    go.wait()
    out.put(summary(sender.run()))


def phase(base: str, keys: dict[str, str], args, with_aggressor: bool, seed: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Event(), ctx.Event()
    child = None
    if with_aggressor:
        child = ctx.Process(target=aggressor_process, args=(
            base, keys["aggressor"], args.victim_rate * args.ratio, args.seconds,
            args.max_tokens, seed + 1, out, ready, go))
        child.start()
        assert ready.wait(120), "the aggressor's process did not start"
        go.set()  # both send for args.seconds from now
    result = {"victim": summary(Sender(base, keys["victim"], args.victim_rate, args.seconds,
                                       args.max_tokens, seed, threads=64).run())}
    if child is not None:
        result["aggressor"] = out.get(timeout=args.seconds + 300)
        child.join()
    result["admission_limits"] = admission_limits(base)
    return result


def admission_limits(base: str) -> list[float]:
    """Each API process's Congestion limit at the end of a phase (its /metrics gauge)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"},
                        timeout=30).text
    return [s.value for f in text_string_to_metric_families(text)
            if f.name == "hydraserve_api_admission_limit" for s in f.samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter phases (about four minutes)")
    ap.add_argument("--json", default=None, help="write raw numbers here")
    ap.add_argument("--victim-rate", type=float, default=5.0, help="victim requests per second")
    ap.add_argument("--ratio", type=float, default=20.0, help="aggressor rate / victim rate")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=None, help="length of each phase")
    ap.add_argument("--nodes", type=int, default=2, help="node agents")
    ap.add_argument("--devices", default="cpu:1",
                    help="each node's devices; cpu:2 on one node gives each tenant's worker "
                         "a core of its own, as a GPU node gives each instance its device")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (alone, together); the key is the median round's ratio")
    args = ap.parse_args()
    args.seconds = args.seconds or (20.0 if args.quick else 60.0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_demo_model(Path(tmp) / "models" / "fair", DemoModelSpec(size="tiny"))
        base, handle = start_cluster(Path(tmp), model_dir, num_nodes=args.nodes,
                                     devices=args.devices)
        try:
            keys = setup_tenants(base, model_dir.as_uri())
            rounds = []
            for r in range(args.rounds):  # alone and together side by side, each round
                rounds.append((phase(base, keys, args, with_aggressor=False, seed=1 + 2 * r),
                               phase(base, keys, args, with_aggressor=True, seed=1 + 2 * r)))
                ratio_r = rounds[-1][1]["victim"]["p50_ms"] / rounds[-1][0]["victim"]["p50_ms"]
                print(f"round {r + 1}/{args.rounds}: victim_p50_vs_alone {ratio_r:.2f}",
                      flush=True)
        finally:
            stop_cluster(handle)
    ratios = [t["victim"]["p50_ms"] / a["victim"]["p50_ms"] for a, t in rounds]
    ratio = statistics.median(ratios)
    alone, together = rounds[ratios.index(sorted(ratios)[(len(ratios) - 1) // 2])]  # the median round
    aggressor = together["aggressor"]
    result = {
        "environment": environment(), "quick": args.quick, "seconds_per_phase": args.seconds,
        "nodes": args.nodes, "devices": args.devices,
        "victim_rate": args.victim_rate, "aggressor_rate": args.victim_rate * args.ratio,
        "max_tokens": args.max_tokens, "alone": alone, "together": together,
        "rounds": [{"alone": a, "together": t} for a, t in rounds],
        "victim_p50_vs_alone_by_round": ratios,
        "victim_p50_vs_alone": ratio, "target": TARGET,
        "victim_p99_vs_alone": together["victim"]["p99_ms"] / alone["victim"]["p99_ms"],
        "aggressor_429": aggressor["statuses"].get("429", 0),
        "aggressor_ok_per_s": aggressor["ok"] / args.seconds,
    }
    rows = [
        {"measure": "victim p50 alone (ms)", "value": alone["victim"]["p50_ms"]},
        {"measure": "victim p50 with the aggressor (ms)", "value": together["victim"]["p50_ms"]},
        {"measure": f"victim_p50_vs_alone, median of {len(ratios)} rounds (target <= {TARGET})",
         "value": ratio},
        {"measure": "victim_p50_vs_alone by round", "value": [round(x, 2) for x in ratios]},
        {"measure": "victim p50 queued to finished, alone / with the aggressor (ms)",
         "value": f"{alone['victim']['server_p50_ms']:.1f} / "
                  f"{together['victim']['server_p50_ms']:.1f}"},
        {"measure": "victim p99 alone / with the aggressor (ms)",
         "value": f"{alone['victim']['p99_ms']:.1f} / {together['victim']['p99_ms']:.1f}"},
        {"measure": "victim answers with the aggressor", "value": together["victim"]["statuses"]},
        {"measure": "victim 429s by limit", "value": together["victim"]["refused_by"]},
        {"measure": "aggressor sent / succeeded / 429",
         "value": f"{aggressor['sent']} / {aggressor['ok']} / {result['aggressor_429']}"},
        {"measure": "aggressor answers", "value": aggressor["statuses"]},
        {"measure": "aggressor 429s by limit", "value": aggressor["refused_by"]},
        {"measure": "API processes' admission limits at the end, alone / together",
         "value": f"{alone['admission_limits']} / {together['admission_limits']}"},
    ]
    print(markdown_table(rows, ["measure", "value"]))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
