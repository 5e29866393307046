"""Gunicorn settings of the API, one place for the local cluster and the compose file:
``gunicorn -c python:hydraserve.api.gunicorn_conf hydraserve.api.wsgi:app``.

Threads, not processes, hold waiting clients: a sync or streaming invocation is mostly waiting
on its reply queue. Keep-alive is longer than a client's usual pause between requests (and
than a load balancer's), so the server does not close a connection at the moment a client
reuses it, which a client sees as a reset on a POST it cannot safely retry.
"""

import os

worker_class = "gthread"
workers = int(os.environ.get("HYDRA_API_WORKERS", "2"))
threads = int(os.environ.get("HYDRA_API_THREADS", "16"))
keepalive = 75  # seconds
bind = os.environ.get("HYDRA_API_BIND", "127.0.0.1:8000")
