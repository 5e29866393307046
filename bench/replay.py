"""Workload replay: a real public serverless trace against the real local cluster, under each
scheduler policy (hydra, and the baselines pp1 and sequential, scheduler/policies.py) on the
same trace and seed in one invocation.

What is replayed:
- per-function arrivals from the Azure Functions 2019 trace (``../shared/data``, the
  1,000-function sample): a window of trace minutes, ``FUNCTIONS`` functions picked at
  log-spaced popularity ranks (a few popular ones and a long tail), their per-minute counts
  scaled by one factor to a request budget, each minute compressed to ``Config.minute_s`` s
  (arrivals uniform within it);
- prompt and output lengths from the Azure LLM inference 2023 trace (code), scaled down for
  these CPU models (prompt tokens = context / 16, 4..128; output = generated, 1..32);
- one random-weight checkpoint per function (Llama and OPT of several sizes);
- SLOs as the seed sets them: TTFT SLO = 1.0 x the time to fetch the function's model over
  one link (``--ttft-scale`` registers another multiple: the planner then plans for it, which
  is the real SLO sweep; ``attainment_by_slo_scale`` re-scores one run's TTFTs against scaled
  SLOs without replanning); TPOT SLO ``TPOT_SLO_S``;
- nodes with emulated links and device memory such that not every function stays warm, and
  a keep-alive of one trace minute (compressed), so keep-alive, eviction and cold starts all
  happen.

How it is invoked: each function belongs to a tenant of its own (``t00``, ``t01``, ..., made
with the admin API, each with its own key; the function is registered and invoked with that
key), as a serverless platform's functions belong to many customers. Invocations are async
(``Prefer: respond-async``; the client polls ``GET /v1/invocations/<id>``, backing off from
0.25 s to 2 s), so none holds one of the API's request slots: with several tenants those slots
follow the congestion limit (down to 2 per API process while warm TTFTs are inflated,
docs/api.md "Fair sharing"), and a sync client would be refused by fair share whenever a
popular function has two requests in flight, which measures the API's admission, not the
scheduler policy. Every figure comes from the invocation's server-side timings (TTFT =
queued to first token), as it did with sync calls. ``--invoke sync`` keeps the sync path.
Every request that does not succeed is counted, by kind (HTTP status and error type/param,
the invocation's failed status and error type, or the client's exception) and message.

Changed since the first run (2026-12-03 14:56Z): one tenant per function and async calls (it
was one tenant, sync: every one of its 98 failures was a 429 ``fair_share``); ``--quick`` is
110 requests over the same 20 trace minutes (it was 240, more than the 2-core VM serves:
cold TTFT medians of 23-52 s against SLOs of 3-8 s); cold starts no longer count the replica
plans a consolidation makes (``consolidation.replica_plans``: a stage that already ran moving
to a plan of its own is no cold start), and the consolidation states of the pipelines, and the
instances' statuses and start failures, are read from the database before the cluster goes
down.

Per policy it reports TTFT-SLO attainment (all, cold), TTFT p50/p90/p99 (cold, warm; cold
also by the pipeline size of the group that served it), TPOT p50/p99, cold starts (plans, by
pipeline size), what became of the pipelines (consolidation states, replicas made),
memory-time per request (GB-s, from the usage records) and failed requests (by kind); and the
keys ``attainment_vs_sequential``, ``attainment_vs_pp1``, ``cost_vs_pp1``,
``cold_ttft_p99_vs_pp1``, ``failed``. Attainment is also re-scored at 0.5x and 2x the SLOs
(the planner planned against 1x) and plotted, with the TTFT CDF per policy.

    python bench/replay.py [--quick] [--json bench/results/replay.json] [--png PATH]
                           [--invoke async|sync]
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import random
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

from bench.common import KEY, environment, markdown_table, write_json  # noqa: E402
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FUNCTIONS_TRACE = DATA / "azure_functions_2019_sample" / "1000_inv.csv"
LENGTHS_TRACE = DATA / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"
POLICIES = ("hydra", "pp1", "sequential")
FUNCTIONS = 12
TPOT_SLO_S = 1.0
SLO_SCALES = (0.5, 1.0, 2.0)
TARGETS = {"attainment_vs_sequential": 1.74, "attainment_vs_pp1": 1.43, "cost_vs_pp1": 0.9}


@dataclass(frozen=True)
class Config:
    """One size of the replay (``--quick`` is the same replay, smaller)."""

    trace_start_min: int
    trace_minutes: int
    minute_s: float  # replay seconds per trace minute
    requests: int  # the budget the per-minute counts are scaled to
    nodes: int
    link_mbps: float
    device_mem: str
    cache_mem: str
    models: tuple[tuple[str, dict], ...]  # (arch, config overrides), cycled over functions


QUICK = Config(trace_start_min=600, trace_minutes=20, minute_s=4.0, requests=110, nodes=4,
               link_mbps=40.0, device_mem="64MiB", cache_mem="64MiB",
               models=(("llama", {"num_hidden_layers": 4}), ("opt", {"num_hidden_layers": 4}),
                       ("llama", {"num_hidden_layers": 8}), ("opt", {"num_hidden_layers": 8}),
                       ("llama", {"num_hidden_layers": 12}), ("llama", {"num_hidden_layers": 6})))
FULL = Config(trace_start_min=600, trace_minutes=60, minute_s=6.0, requests=1200, nodes=6,
              link_mbps=800.0, device_mem="1GiB", cache_mem="1GiB",
              models=tuple((arch, {"hidden_size": 1024, "intermediate_size": 2816,
                                   "ffn_dim": 4096, "num_attention_heads": 16,
                                   "num_key_value_heads": 8, "word_embed_proj_dim": 1024,
                                   "vocab_size": 8192, "num_hidden_layers": layers})
                           for arch, layers in (("llama", 8), ("opt", 8), ("llama", 16),
                                                ("opt", 16), ("llama", 24), ("llama", 12))))


# ---- the workload ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Arrival:
    at_s: float
    function: int
    prompt_tokens: int
    max_tokens: int


def workload(cfg: Config, seed: int) -> tuple[list[Arrival], dict]:
    """Arrivals of FUNCTIONS functions over the window, and what was taken from the traces."""
    rng = random.Random(seed)
    with open(FUNCTIONS_TRACE, newline="") as f:
        rows = list(csv.reader(f))[1:]
    lo, hi = 3 + cfg.trace_start_min, 3 + cfg.trace_start_min + cfg.trace_minutes
    counts = [[int(x) for x in r[lo:hi]] for r in rows]
    ranked = sorted((c for c in counts if sum(c) > 0), key=sum, reverse=True)
    picks = sorted({min(len(ranked) - 1, round(2 ** (i * 9 / (FUNCTIONS - 1))) - 1)
                    for i in range(FUNCTIONS)})
    while len(picks) < FUNCTIONS:  # log-spaced ranks collide at the head: fill the gaps
        picks = sorted(set(picks) | {next(i for i in range(len(ranked)) if i not in picks)})
    chosen = [ranked[i] for i in picks]
    total = sum(map(sum, chosen))
    scale = cfg.requests / total
    with open(LENGTHS_TRACE, newline="") as f:
        lengths = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    arrivals = []
    for fn, minutes in enumerate(chosen):
        carry = 0.0
        for minute, n in enumerate(minutes):
            carry += n * scale  # keep the fraction: a rare function still comes, at its rate
            k, carry = int(carry), carry - int(carry)
            for _ in range(k):
                arrivals.append(arrival(rng, lengths, minute, fn, cfg))
        busy = [m for m, n in enumerate(minutes) if n]
        if rng.random() < carry:  # the fraction left at the end, kept in expectation
            arrivals.append(arrival(rng, lengths, rng.choice(busy), fn, cfg))
    arrivals.sort(key=lambda a: a.at_s)
    info = {"functions_trace": str(FUNCTIONS_TRACE.relative_to(DATA.parent)),
            "lengths_trace": str(LENGTHS_TRACE.relative_to(DATA.parent)),
            "trace_minutes": [cfg.trace_start_min, cfg.trace_start_min + cfg.trace_minutes],
            "popularity_ranks": picks, "trace_invocations": total, "scale": scale,
            "compression": 60.0 / cfg.minute_s, "requests": len(arrivals),
            "requests_per_function": dict(Counter(a.function for a in arrivals))}
    return arrivals, info


def arrival(rng: random.Random, lengths: list[tuple[int, int]], minute: int, fn: int,
            cfg: Config) -> Arrival:
    context, generated = rng.choice(lengths)
    return Arrival((minute + rng.random()) * cfg.minute_s, fn, max(4, min(128, context // 16)),
                   max(1, min(32, generated)))


def make_models(root: Path, cfg: Config) -> list[tuple[Path, int]]:
    """One checkpoint per function (its own seed: no two share bytes or a cache entry)."""
    out = []
    for fn in range(FUNCTIONS):
        arch, overrides = cfg.models[fn % len(cfg.models)]
        keys = {"llama": ("ffn_dim", "word_embed_proj_dim"),
                "opt": ("intermediate_size", "num_key_value_heads")}[arch]
        spec = DemoModelSpec(arch=arch, size="small", seed=100 + fn, overrides=tuple(
            (k, v) for k, v in overrides.items() if k not in keys))
        path = make_demo_model(root / f"fn{fn:02d}-{arch}", spec)
        out.append((path, sum(p.stat().st_size for p in path.glob("*.safetensors"))))
    return out


# ---- one policy on the cluster ---------------------------------------------------------------

@dataclass
class Outcome:
    function: int
    ok: bool
    cold: bool | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    slo_s: float = 0.0
    error: str | None = None  # the message
    kind: str | None = None  # what failed: "HTTP 429 rate_limit_error/fair_share", ...
    pp: int | None = None  # the pipeline size of the group that served it (as started)
    breakdown_ms: dict[str, float] | None = None  # the TTFT's phases (queue/plan, fetch, ...)


FINISHED = ("succeeded", "failed", "cancelled")
POLL_S = (0.25, 0.5, 1.0, 2.0)  # the async client's waits between polls, then 2 s each
GIVE_UP_S = 700.0  # the platform fails what waited in its queue for max_queue_s (600 s)


@dataclass
class Client:
    """Sends one invocation per arrival with its function's tenant key; ``sync`` waits on the
    POST (holding an API request slot), otherwise it is async and polled."""

    base: str
    keys: list[str]  # the tenant key of each function
    sync: bool = False
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def one(self, a: Arrival, slo_s: float) -> None:
        u = urlparse(self.base)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=GIVE_UP_S)
        headers = {"Authorization": f"Bearer {self.keys[a.function]}",
                   "Content-Type": "application/json"}
        if not self.sync:
            headers["Prefer"] = "respond-async"
        body = json.dumps({"prompt_ids": [1 + (i * 7) % 500 for i in range(a.prompt_tokens)],
                           "max_tokens": a.max_tokens})
        try:
            try:
                status, data = self._call(conn, "POST", f"/v1/functions/fn{a.function:02d}/"
                                          "invocations?timeout_s=600", body, headers)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._fail(a, slo_s, f"client {type(exc).__name__}", str(exc))
                return
            if status == 202:  # accepted: poll it (or, sync, the deadline passed)
                data = self._poll(conn, a, slo_s, data.get("id"), headers)
                if data is None:
                    return
            elif status != 200:
                err = data.get("error") or {}
                self._fail(a, slo_s, f"HTTP {status} {err.get('type')}/{err.get('param')}",
                           err.get("message") or f"HTTP {status}")
                return
        finally:
            conn.close()
        if data.get("status") != "succeeded":
            err = data.get("error") or {}
            self._fail(a, slo_s, f"{data.get('status')} {err.get('type')}",
                       err.get("message") or str(data.get("status")))
            return
        t = data["timings"]
        ttft = t["ttft_ms"] / 1000 if t.get("ttft_ms") is not None else None
        tpot = None
        if (data.get("tokens_out") or 0) >= 2 and t.get("first_token_at") and t.get("finished_at"):
            span = (datetime.fromisoformat(t["finished_at"])
                    - datetime.fromisoformat(t["first_token_at"])).total_seconds()
            tpot = span / (data["tokens_out"] - 1)
        pp = (data.get("group") or {}).get("pp")
        self._add(Outcome(a.function, True, bool(data.get("cold")), ttft, tpot, slo_s, pp=pp,
                          breakdown_ms=t.get("breakdown_ms")))

    def _poll(self, conn: http.client.HTTPConnection, a: Arrival, slo_s: float,
              inv_id: str | None, headers: dict) -> dict | None:
        """The finished invocation, or None once its failure is recorded."""
        if not inv_id:
            self._fail(a, slo_s, "client no id", "a 202 without an invocation id")
            return None
        give_up, polls, errors, data = time.monotonic() + GIVE_UP_S, 0, 0, {}
        while time.monotonic() < give_up:
            time.sleep(POLL_S[min(polls, len(POLL_S) - 1)])
            polls += 1
            try:
                status, data = self._call(conn, "GET", f"/v1/invocations/{inv_id}", None,
                                          {"Authorization": headers["Authorization"]})
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()  # a GET is safe to repeat: reconnect on the next poll
                errors += 1
                if errors >= 5:
                    self._fail(a, slo_s, f"client {type(exc).__name__}", str(exc))
                    return None
                continue
            if status != 200:
                err = data.get("error") or {}
                self._fail(a, slo_s, f"HTTP {status} {err.get('type')}/{err.get('param')} (poll)",
                           err.get("message") or f"HTTP {status}")
                return None
            if data.get("status") in FINISHED:
                return data
        self._fail(a, slo_s, "client gave up", f"still {data.get('status')} after {GIVE_UP_S} s")
        return None

    @staticmethod
    def _call(conn: http.client.HTTPConnection, method: str, path: str, body: str | None,
              headers: dict) -> tuple[int, dict]:
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"error": {"type": "not_json", "message": raw[:200].decode(errors="replace")}}
        return resp.status, data if isinstance(data, dict) else {}

    def _fail(self, a: Arrival, slo_s: float, kind: str, message: str) -> None:
        self._add(Outcome(a.function, False, slo_s=slo_s, error=str(message)[:200], kind=kind))

    def _add(self, o: Outcome) -> None:
        with self.lock:
            self.outcomes.append(o)


def make_tenants(base: str, n: int) -> list[str]:
    """Tenants t00..t<n-1>, one per function, each with a key of its own (returned in order)."""
    admin = {"Authorization": f"Bearer {KEY}"}
    keys = []
    for fn in range(n):
        name = f"t{fn:02d}"
        requests.post(f"{base}/v1/admin/tenants", json={"name": name}, headers=admin,
                      timeout=60).raise_for_status()
        r = requests.post(f"{base}/v1/admin/tenants/{name}/keys", json={"name": "replay"},
                          headers=admin, timeout=60)
        r.raise_for_status()
        keys.append(r.json()["key"])
    return keys


def run_policy(policy: str, cfg: Config, models: list[tuple[Path, int]],
               arrivals: list[Arrival], root: Path, sync: bool = False,
               ttft_scale: float = 1.0) -> dict:
    from sqlalchemy import create_engine, text

    from gpu_runtime.ports import free_port
    from hydraserve import devcluster
    from hydraserve.cli.db import create_database, drop_database, upgrade
    from hydraserve.settings import Settings

    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/hydraserve_replay_{policy}_{int(time.time())}"
    create_database(url)
    upgrade(url)
    store_root = models[0][0].parent
    settings = Settings(database_url=url, store_root=str(store_root), admin_key=KEY,
                        api_port=free_port(), queue_prefix=f"r{policy[:3]}{int(time.time()) % 10**6}.",
                        scheduler_policy=policy, max_queue_s=600)
    spec = devcluster.ClusterSpec(num_nodes=cfg.nodes, link_mbps=cfg.link_mbps,
                                  device_mem=cfg.device_mem, worker_threads=1,
                                  store_port=free_port(), cache_mem=cfg.cache_mem)
    (root / policy).mkdir(parents=True, exist_ok=True)
    layout = devcluster.Layout(root / policy)
    base = devcluster.start_cluster(layout, settings, KEY, spec)
    link_bytes_per_s = cfg.link_mbps * 125_000
    slos = []
    try:
        keys = make_tenants(base, len(models))
        for fn, (path, nbytes) in enumerate(models):
            slo_s = round(ttft_scale * nbytes / link_bytes_per_s, 3)  # x the fetch over one link
            slos.append(slo_s)
            requests.put(f"{base}/v1/functions/fn{fn:02d}", timeout=120,
                         headers={"Authorization": f"Bearer {keys[fn]}"},
                         json={"model": path.as_uri(), "keep_alive_s": max(1, round(cfg.minute_s)),
                               "slo": {"ttft_ms": int(slo_s * 1000),
                                       "tpot_ms": int(TPOT_SLO_S * 1000)}}).raise_for_status()
        client = Client(base, keys, sync=sync)
        pool = ThreadPoolExecutor(256)
        start = time.perf_counter()
        for a in arrivals:
            time.sleep(max(0.0, start + a.at_s - time.perf_counter()))
            pool.submit(client.one, a, slos[a.function])
        pool.shutdown(wait=True)
        wall_s = time.perf_counter() - start
        engine = create_engine(url)
        with engine.connect() as conn:
            gb_s = conn.execute(text(
                "SELECT coalesce(sum(memory_gb * extract(epoch FROM coalesce(ended_at, now())"
                " - started_at)), 0) FROM usage_records")).scalar()
            plans = [dict(r._mapping) for r in conn.execute(text(
                "SELECT id, pp, status, consolidation_state, consolidation_target,"
                " consolidation_reason, consolidation FROM plans ORDER BY id"))]
            instances = [dict(r._mapping) for r in conn.execute(text(
                "SELECT status, error FROM instances ORDER BY id"))]
        engine.dispose()
    finally:
        devcluster.stop_cluster(layout, spec, settings.queue_prefix)
        drop_database(url)
    return summarize(policy, client.outcomes, float(gb_s), plans, wall_s) | {
        "instance_statuses": dict(Counter(i["status"] for i in instances)),
        "instance_errors": dict(Counter((i["error"] or "")[:160] for i in instances
                                        if i["status"] == "failed").most_common(5))}


def plan_summary(plans: list[dict]) -> dict:
    """Cold starts (plans, less the replica plans a consolidation made: a stage that already
    ran moving to a plan of its own) by pipeline size, and what became of the pipelines."""
    replicas = {i for p in plans for i in (p["consolidation"] or {}).get("replica_plans", [])}
    starts = [p for p in plans if p["id"] not in replicas]
    pipelines = [p for p in starts if p["pp"] > 1]
    not_consolidated = Counter(f"{p['consolidation_state'] or 'pending'}: "
                               f"{(p['consolidation_reason'] or '')[:120]}"
                               for p in pipelines if p["consolidation_state"] != "consolidated")
    return {"cold_starts": len(starts),
            "plans_by_pp": {str(k): v for k, v in sorted(Counter(p["pp"] for p in starts).items())},
            "plan_statuses": dict(Counter(p["status"] for p in starts)),
            "pipelines": len(pipelines),
            "consolidation_states": dict(Counter(p["consolidation_state"] or "pending"
                                                 for p in pipelines)),
            "replica_plans": len(replicas),
            "not_consolidated": dict(not_consolidated.most_common(5))}


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else None


def attainment(outcomes: list[Outcome], scale: float, cold_only: bool = False) -> float:
    pool = [o for o in outcomes if not cold_only or o.cold]
    met = sum(1 for o in pool if o.ok and o.ttft_s is not None and o.ttft_s <= o.slo_s * scale)
    return met / len(pool) if pool else float("nan")


def summarize(policy: str, outcomes: list[Outcome], gb_s: float, plans: list[dict],
              wall_s: float) -> dict:
    ok = [o for o in outcomes if o.ok]
    cold = [o.ttft_s for o in ok if o.cold and o.ttft_s is not None]
    warm = [o.ttft_s for o in ok if not o.cold and o.ttft_s is not None]
    tpots = [o.tpot_s for o in ok if o.tpot_s is not None]
    by_pp = {}
    for pp in sorted({o.pp for o in ok if o.pp is not None}):
        mine = [o for o in ok if o.pp == pp]
        cold_pp = [o.ttft_s for o in mine if o.cold and o.ttft_s is not None]
        by_pp[str(pp)] = {"requests": len(mine), "cold_requests": len(cold_pp),
                          "cold_attainment": attainment(mine, 1.0, True),
                          "ttft_cold_s": {"p50": pct(cold_pp, .5), "p90": pct(cold_pp, .9)},
                          "tpot_p50_s": pct([o.tpot_s for o in mine if o.tpot_s is not None], .5)}
    return {
        "policy": policy, "requests": len(outcomes), "succeeded": len(ok),
        "failed": len(outcomes) - len(ok),
        "failures_by_kind": dict(Counter(o.kind for o in outcomes if not o.ok).most_common()),
        "errors": dict(Counter(o.error for o in outcomes if not o.ok).most_common(5)),
        "attainment": attainment(outcomes, 1.0), "cold_attainment": attainment(outcomes, 1.0, True),
        "attainment_by_slo_scale": {str(s): attainment(outcomes, s) for s in SLO_SCALES},
        "cold_requests": len(cold), "ttft_cold_s": {q: pct(cold, p) for q, p in
                                                    (("p50", .5), ("p90", .9), ("p99", .99))},
        "ttft_warm_s": {q: pct(warm, p) for q, p in (("p50", .5), ("p90", .9), ("p99", .99))},
        "tpot_s": {"p50": pct(tpots, .5), "p99": pct(tpots, .99)},
        "cold_breakdown_ms_p50": cold_breakdown(ok),
        "by_group_pp": by_pp, **plan_summary(plans),
        "gb_s": gb_s, "gb_s_per_request": gb_s / max(len(outcomes), 1), "wall_s": wall_s,
        "ttfts_s": sorted(o.ttft_s for o in ok if o.ttft_s is not None),
    }


def cold_breakdown(ok: list[Outcome]) -> dict[str, float | None]:
    """The median of each TTFT phase over the cold requests (where the cold time goes)."""
    phases = ("plan", "fetch", "load", "first_token")
    cold = [o.breakdown_ms or {} for o in ok if o.cold]
    return {p: pct([b[p] for b in cold if p in b], .5) for p in phases}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for policy, r in results.items():
        left.plot(SLO_SCALES, [r["attainment_by_slo_scale"][str(s)] for s in SLO_SCALES],
                  marker="o", label=policy)
        xs = r["ttfts_s"]
        right.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=policy)
    left.set(xlabel="TTFT SLO scale (x the fetch over one link)", ylabel="TTFT-SLO attainment",
             ylim=(0, 1.05), title="attainment against the SLO scale")
    right.set(xlabel="TTFT (s)", ylabel="fraction of requests", xscale="log", title="TTFT CDF")
    for ax in (left, right):
        ax.grid(alpha=.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a shorter slice, smaller models")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None, help="default: next to --json, or bench/results")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--ttft-scale", type=float, default=1.0,
                    help="register TTFT SLOs at this multiple of the fetch over one link")
    ap.add_argument("--invoke", choices=("async", "sync"), default="async",
                    help="async (polled; the default) or sync (holds an API request slot)")
    args = ap.parse_args()
    if args.ttft_scale <= 0:
        ap.error(f"--ttft-scale must be > 0, got {args.ttft_scale}")
    cfg = QUICK if args.quick else FULL
    arrivals, info = workload(cfg, args.seed)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = make_models(Path(tmp) / "models", cfg)
        for policy in args.policies.split(","):
            print(f"{policy}: replaying {len(arrivals)} requests ...", flush=True)
            results[policy] = r = run_policy(policy, cfg, models, arrivals, Path(tmp),
                                             sync=args.invoke == "sync",
                                             ttft_scale=args.ttft_scale)
            print(f"{policy}: attainment {r['attainment']:.3f}, failed {r['failed']} "
                  f"{r['failures_by_kind']}, cold starts {r['plans_by_pp']}, pipelines "
                  f"{r['consolidation_states']}, replicas {r['replica_plans']}, "
                  f"{r['wall_s']:.0f} s", flush=True)
            if args.json:  # what ran so far, should a later policy fail
                write_json(args.json, {"partial": True, "quick": args.quick, "seed": args.seed,
                                       "invoke": args.invoke, "workload": info,
                                       "policies": results})
    h, p1, sq = (results.get(k) for k in POLICIES)
    keys = {
        "attainment_vs_sequential": ratio(h and h["attainment"], sq and sq["attainment"]),
        "attainment_vs_pp1": ratio(h and h["attainment"], p1 and p1["attainment"]),
        "cost_vs_pp1": ratio(h and h["gb_s_per_request"], p1 and p1["gb_s_per_request"]),
        "cold_ttft_p99_vs_pp1": ratio(h and h["ttft_cold_s"]["p99"],
                                      p1 and p1["ttft_cold_s"]["p99"]),
        "failed": sum(r["failed"] for r in results.values()),
    }
    rows = [{"policy": k, "attainment": r["attainment"], "cold attainment": r["cold_attainment"],
             "cold TTFT p50/p90/p99 (s)": "/".join(f"{v:.2f}" if v is not None else "-"
                                                   for v in r["ttft_cold_s"].values()),
             "warm TTFT p50/p99 (s)": "/".join(f"{r['ttft_warm_s'][q]:.3f}"
                                               if r["ttft_warm_s"][q] is not None else "-"
                                               for q in ("p50", "p99")),
             "TPOT p50/p99 (ms)": "/".join(f"{r['tpot_s'][q] * 1000:.1f}"
                                           if r["tpot_s"][q] is not None else "-"
                                           for q in ("p50", "p99")),
             "cold starts (by pp)": f"{r['cold_starts']} {r['plans_by_pp']}",
             "cold plan/fetch/load/first token p50 (s)": "/".join(
                 f"{v / 1000:.2f}" if v is not None else "-"
                 for v in r["cold_breakdown_ms_p50"].values()),
             "pipelines consolidated (+replicas)": f"{r['consolidation_states'].get('consolidated', 0)}"
                                                  f"/{r['pipelines']} (+{r['replica_plans']})",
             "GB-s per request": r["gb_s_per_request"], "failed": r["failed"]}
            for k, r in results.items()]
    print(markdown_table(rows, list(rows[0]), floatfmt="{:.3f}"))
    print(markdown_table([{"policy": k, "group pp": pp, "requests": g["requests"],
                           "cold requests": g["cold_requests"],
                           "cold attainment": g["cold_attainment"],
                           "cold TTFT p50/p90 (s)": "/".join(f"{v:.2f}" if v is not None else "-"
                                                             for v in g["ttft_cold_s"].values()),
                           "TPOT p50 (ms)": g["tpot_p50_s"] * 1000
                           if g["tpot_p50_s"] is not None else None}
                          for k, r in results.items() for pp, g in r["by_group_pp"].items()],
                         ["policy", "group pp", "requests", "cold requests", "cold attainment",
                          "cold TTFT p50/p90 (s)", "TPOT p50 (ms)"], floatfmt="{:.3f}"))
    print(markdown_table([{"key": k, "value": v, "target": TARGETS.get(k, "0" if k == "failed"
                                                                        else "")}
                          for k, v in keys.items()], ["key", "value", "target"], "{:.3f}"))
    png = Path(args.png) if args.png else (Path(args.json).with_suffix(".png") if args.json
                                           else Path("bench/results/replay.png"))
    plot(results, png)
    write_json(args.json, {"environment": environment(), "quick": args.quick, "seed": args.seed,
                           "invoke": args.invoke, "tenants": "one per function",
                           "config": cfg.__dict__ | {"models": [list(m) for m in cfg.models]},
                           "ttft_slo": f"{args.ttft_scale} x the model's fetch over one link",
                           "ttft_scale": args.ttft_scale,
                           "tpot_slo_s": TPOT_SLO_S, "workload": info, "keys": keys,
                           "targets": TARGETS, "policies": results, "png": str(png)})


if __name__ == "__main__":
    main()
