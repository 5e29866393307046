"""Fixtures that start real processes: gunicorn serving the API on a free port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from gpu_runtime.ports import free_port
from tests.conftest import ADMIN_KEY, REPO_ROOT, fresh_database_url

BIN = Path(sys.executable).parent




def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.2)
    raise AssertionError(f"{url} not healthy after {timeout_s} s")


@pytest.fixture(scope="module")
def e2e_env(store_root, tmp_path_factory):
    from hydraserve.cli.db import drop_database, upgrade

    url = fresh_database_url("e2e")
    upgrade(url)
    env = os.environ | {"HYDRA_DATABASE_URL": url, "HYDRA_STORE_ROOT": str(store_root),
                        "HYDRA_ADMIN_KEY": ADMIN_KEY}
    yield env
    drop_database(url)


@pytest.fixture(scope="module")
def api_server(e2e_env, tmp_path_factory):
    """gunicorn with the API's own configuration (worker class, limits), smaller and on a
    free port."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("api") / "gunicorn.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "gunicorn"), "-c", "python:hydraserve.api.gunicorn_conf", "--workers", "2",
         "--threads", "4", "--bind", f"127.0.0.1:{port}", "hydraserve.api.wsgi:app"],
        cwd=REPO_ROOT, env=e2e_env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", proc)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
