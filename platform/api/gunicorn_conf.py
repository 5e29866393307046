"""Gunicorn settings of the API, one place for the local cluster and the compose file:
``gunicorn -c python:hydraserve.api.gunicorn_conf hydraserve.api.wsgi:app``.

Threads, not processes, hold waiting clients: a sync or streaming invocation is mostly waiting
on its reply queue. Keep-alive is longer than a client's usual pause between requests (and
than a load balancer's), so the server does not close a connection at the moment a client
reuses it, which a client sees as a reset on a POST it cannot safely retry.

The worker is gunicorn's gthread worker answering the requests gunicorn itself rejects (the
limits below, malformed lines) with the API's JSON error body (``http_worker``). The limits
are gunicorn's defaults, stated so docs/api.md can quote them: the longest request line the
API needs is a 63-character name or a 40-character id with a short query string, and a header
holds at most a key.
"""

import os
import shutil
import tempfile

from hydraserve.settings import DEFAULT_API_THREADS

worker_class = "hydraserve.api.http_worker.JsonErrorWorker"
workers = int(os.environ.get("HYDRA_API_WORKERS", "2"))
threads = int(os.environ.get("HYDRA_API_THREADS", DEFAULT_API_THREADS))
keepalive = 75  # seconds
bind = os.environ.get("HYDRA_API_BIND", "127.0.0.1:8000")
limit_request_line = 4094  # bytes of "METHOD /path?query HTTP/1.1"; longer: 414
limit_request_fields = 100  # header fields; more: 431
limit_request_field_size = 8190  # bytes of one "Name: value\r\n" line; longer: 431

# Metrics: every worker writes its samples to files in one folder, which /metrics reads whole
# (hydraserve/metrics.py). Set here, in the master, so the workers inherit it; emptied when the
# server starts, removed when it exits; a dead worker's live gauges are dropped.
metrics_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(tempfile.gettempdir(), f"hydraserve-api-metrics-{os.getpid()}"))


def on_starting(server) -> None:
    shutil.rmtree(metrics_dir, ignore_errors=True)
    os.makedirs(metrics_dir, exist_ok=True)


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, metrics_dir)


def on_exit(server) -> None:
    shutil.rmtree(metrics_dir, ignore_errors=True)
