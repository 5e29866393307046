"""Gunicorn settings of the API, one place for the local cluster and the compose file:
``gunicorn -c python:hydraserve.api.gunicorn_conf hydraserve.api.wsgi:app``.

Threads, not processes, hold waiting clients: a sync or streaming invocation is mostly waiting
on its reply queue. Keep-alive is longer than a client's usual pause between requests (and
than a load balancer's), so the server does not close a connection at the moment a client
reuses it, which a client sees as a reset on a POST it cannot safely retry.
"""

import os
import shutil
import tempfile

worker_class = "gthread"
workers = int(os.environ.get("HYDRA_API_WORKERS", "2"))
threads = int(os.environ.get("HYDRA_API_THREADS", "16"))
keepalive = 75  # seconds
bind = os.environ.get("HYDRA_API_BIND", "127.0.0.1:8000")

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
