"""Prometheus metrics and their exposition (docs/metrics.md).

Under gunicorn every worker process writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` (set by api/gunicorn_conf.py before the workers fork) and
``/metrics`` reads them all, so a scrape sees the whole API whichever worker answers. A node
agent does the same for its serving workers (``hydraserve node`` sets the folder before it
starts any). Without that variable (a test client, one process) the process's own registry is
exposed. Serving metrics keep vLLM's names, with the function as ``model_name``.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

RATE_LIMITED = Counter(
    "hydraserve_rate_limited", "Requests answered 429, by the limit or fair share that refused "
    "them and the tenant (empty before authentication)", ["limit", "tenant"])
ADMISSION_LIMIT = Gauge(
    "hydraserve_api_admission_limit", "Sync and streaming invocations an API process takes at "
    "once while several tenants use it (tenants/fairness.py Congestion), per process",
    multiprocess_mode="liveall")


def exposition() -> tuple[bytes, str]:
    """The text exposition of every process's metrics, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest(multiprocess_registry()), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# ---- serving workers (stage 0 of each group; tasks/node/request_loop.py) ---------------------
SERVING = ["model_name", "cold"]
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5.0, 10.0, 20.0,
                   40.0, 80.0, 160.0)
TTFT = Histogram("vllm:time_to_first_token_seconds", "From acceptance to the first token",
                 SERVING, buckets=LATENCY_BUCKETS)
E2E = Histogram("vllm:e2e_request_latency_seconds", "From acceptance to the last token",
                SERVING, buckets=LATENCY_BUCKETS)
QUEUE_TIME = Histogram("vllm:request_queue_time_seconds", "From acceptance until a worker "
                       "claimed it (a cold start's whole wait)", SERVING, buckets=LATENCY_BUCKETS)
ITL = Histogram("vllm:inter_token_latency_seconds", "Mean time between output tokens of a "
                "request", SERVING, buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16,
                                             0.32, 0.64, 1.28))
PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests",
                        ["model_name"])
GENERATION_TOKENS = Counter("vllm:generation_tokens", "Output tokens of finished requests",
                            ["model_name"])
RUNNING = Gauge("vllm:num_requests_running", "Requests in the engine", ["model_name"],
                multiprocess_mode="livesum")
WAITING = Gauge("vllm:num_requests_waiting", "Requests delivered, not yet in the engine",
                ["model_name"], multiprocess_mode="livesum")
KV_USAGE = Gauge("vllm:kv_cache_usage_perc", "Share of the KV cache blocks in use, 0..1, per "
                 "serving worker", ["model_name"], multiprocess_mode="liveall")
COLD_START_PHASE = Histogram("hydraserve_cold_start_phase_seconds", "Phases of the TTFT of cold "
                             "requests: plan, fetch, load, prefill", ["model_name", "phase"],
                             buckets=LATENCY_BUCKETS)


def multiprocess_registry(path: str | None = None) -> CollectorRegistry:
    """Every process's samples in ``path`` (default: PROMETHEUS_MULTIPROC_DIR)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry
