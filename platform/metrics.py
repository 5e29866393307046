"""Prometheus metrics of the control plane, and their exposition.

Under gunicorn every worker process writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` (set by api/gunicorn_conf.py before the workers fork) and
``/metrics`` reads them all, so a scrape sees the whole API whichever worker answers. Without
that variable (a test client, one process) the process's own registry is exposed.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
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
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
