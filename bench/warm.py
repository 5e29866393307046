"""Warm-path overhead: API -> request queue -> worker -> first token -> API, minus the model's
own compute, and requests per second at concurrency 1, 16 and 64, on a tiny model.

Side by side in one run: the same requests through the in-process engine (the baseline: pure
compute, no platform) and through a real local cluster (gunicorn API, scheduler, one node agent,
Postgres, RabbitMQ).

    python bench/warm.py [--quick] [--json bench/results/warm.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import KEY, environment, markdown_table, start_cluster, stop_cluster, write_json  # noqa: E402
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model  # noqa: E402
from gpu_runtime.engine import EngineConfig, LLMEngine  # noqa: E402
from gpu_runtime.sampling import SamplingParams  # noqa: E402

PROMPT = [1, 17, 33, 49, 65, 81, 97, 113]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


def engine_first_token_ms(model_dir: Path, repeats: int) -> float:
    """Median time the engine alone takes from add_request to the first token."""
    times = []
    with LLMEngine(EngineConfig(model=str(model_dir), num_threads=1)) as engine:
        for i in range(repeats + 3):
            start = time.perf_counter()
            engine.add_request(f"r{i}", PROMPT, SamplingParams(max_tokens=1))
            while engine.has_unfinished():
                engine.step()
            if i >= 3:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def engine_rps(model_dir: Path, concurrency: int, total: int, max_tokens: int) -> float:
    """Requests per second of the engine alone, keeping ``concurrency`` requests in flight."""
    with LLMEngine(EngineConfig(model=str(model_dir), num_threads=1)) as engine:
        sent = done = 0
        start = time.perf_counter()
        while done < total:
            while sent < total and sent - done < concurrency:
                engine.add_request(f"r{sent}", PROMPT, SamplingParams(max_tokens=max_tokens,
                                                                      ignore_eos=True))
                sent += 1
            done += sum(out.finished for out in engine.step())
        return total / (time.perf_counter() - start)


def invoke(session: requests.Session, base: str, max_tokens: int) -> dict:
    resp = session.post(f"{base}/v1/functions/warm/invocations?timeout_s=120",
                        json={"prompt_ids": PROMPT, "max_tokens": max_tokens},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=150)
    assert resp.status_code == 200, resp.text
    return resp.json()


def platform_rps(base: str, concurrency: int, total: int, max_tokens: int) -> float:
    local = threading.local()  # one keep-alive session per client thread

    def one(_i: int) -> dict:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return invoke(local.session, base, max_tokens)

    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        list(pool.map(one, range(total)))
        return total / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests (about a minute)")
    ap.add_argument("--json", default=None, help="write raw numbers here")
    args = ap.parse_args()
    n_latency = 40 if args.quick else 200
    totals = {1: 20, 16: 64, 64: 128} if args.quick else {1: 60, 16: 256, 64: 512}
    max_tokens = 8
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_demo_model(Path(tmp) / "models" / "warm", DemoModelSpec(size="tiny"))
        engine_ms = engine_first_token_ms(model_dir, 50)
        base_rps = {c: engine_rps(model_dir, c, t, max_tokens) for c, t in totals.items()}
        base, handle = start_cluster(Path(tmp), model_dir)
        try:
            requests.put(f"{base}/v1/functions/warm", headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": model_dir.as_uri(), "slo": {"ttft_ms": 60000, "tpot_ms": 1000},
                               "keep_alive_s": 3600}, timeout=60).raise_for_status()
            session = requests.Session()
            invoke(session, base, 1)  # the cold start
            for _ in range(5):
                invoke(session, base, 1)
            latencies, ttfts = [], []
            for _ in range(n_latency):
                start = time.perf_counter()
                inv = invoke(session, base, 1)
                latencies.append((time.perf_counter() - start) * 1000)
                ttfts.append(inv["timings"]["ttft_ms"])
            rps = {c: platform_rps(base, c, t, max_tokens) for c, t in totals.items()}
        finally:
            stop_cluster(handle)
    overhead = [lat - engine_ms for lat in latencies]
    result = {
        "environment": environment(), "quick": args.quick, "requests": n_latency,
        "engine_first_token_ms": engine_ms,
        "latency_p50_ms": pct(latencies, 0.5), "latency_p99_ms": pct(latencies, 0.99),
        "server_ttft_p50_ms": pct(ttfts, 0.5),
        "overhead_p50_ms": pct(overhead, 0.5), "overhead_p99_ms": pct(overhead, 0.99),
        "rps": {str(c): v for c, v in rps.items()},
        "engine_rps": {str(c): v for c, v in base_rps.items()},
        "rps_vs_engine": {str(c): rps[c] / base_rps[c] for c in rps},
        "max_tokens_for_rps": max_tokens,
    }
    rows = [{"measure": "first token, engine alone (ms)", "value": engine_ms},
            {"measure": "first token through the platform p50 (ms)", "value": result["latency_p50_ms"]},
            {"measure": "first token through the platform p99 (ms)", "value": result["latency_p99_ms"]},
            {"measure": "overhead p50 (ms, target <= 15)", "value": result["overhead_p50_ms"]},
            {"measure": "overhead p99 (ms)", "value": result["overhead_p99_ms"]}]
    rows += [{"measure": f"req/s at concurrency {c}: platform / engine",
              "value": f"{rps[c]:.1f} / {base_rps[c]:.1f} ({rps[c] / base_rps[c]:.2f}x)"}
             for c in rps]
    print(markdown_table(rows, ["measure", "value"]))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
