"""A whole local cluster for end-to-end tests: API, scheduler, store and node agents, each a
real process, on a throwaway database and queue namespace."""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import requests
from sqlalchemy import create_engine, text

from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.ports import free_port
from gpu_runtime.sampling import SamplingParams
from hydraserve import devcluster
from hydraserve.settings import Settings
from tests.conftest import ADMIN_KEY

HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class Cluster:
    base: str
    settings: Settings
    layout: devcluster.Layout
    spec: devcluster.ClusterSpec
    extra_nodes: list[str] = field(default_factory=list)  # joined with start_node

    def __post_init__(self) -> None:
        # pre-ping: a test that restarts Postgres goes on querying through the same engine
        self.db = create_engine(self.settings.database_url, pool_pre_ping=True)

    def register(self, name: str, model_dir, **extra) -> dict:
        body = {"model": model_dir.as_uri(), "slo": {"ttft_ms": 120_000, "tpot_ms": 5_000}} | extra
        resp = requests.put(f"{self.base}/v1/functions/{name}", json=body, headers=HEADERS,
                            timeout=60)
        assert resp.status_code == 201, resp.text
        return resp.json()

    def invoke(self, name: str, body: dict, headers: dict | None = None, timeout_s: int = 240,
               **kw) -> requests.Response:
        return requests.post(f"{self.base}/v1/functions/{name}/invocations?timeout_s={timeout_s}",
                             json=body, headers=HEADERS | (headers or {}),
                             timeout=timeout_s + 30, **kw)

    def get(self, inv_id: str) -> dict:
        return requests.get(f"{self.base}/v1/invocations/{inv_id}", headers=HEADERS,
                            timeout=30).json()

    def query(self, sql: str, **params) -> list:
        with self.db.connect() as conn:
            return list(conn.execute(text(sql), params))

    def start_node(self, node_id: str, cache_mem: str | None = None,
                   link_mbps: float | None = None) -> None:
        """Starts one more node agent, as the cluster's own are started but with its own
        cache pool size and link; returns once it has registered and booted."""
        spec = self.spec
        env = devcluster.child_env(self.layout, self.settings, ADMIN_KEY)
        cli = str(Path(sys.executable).parent / "hydraserve")
        link = ["--link-mbps", str(link_mbps)] if link_mbps else []
        self.extra_nodes.append(node_id)
        devcluster.start(self.layout, f"node-{node_id}", [
            cli, "node", "--node-id", node_id, "--devices", spec.devices, "--device-mem",
            spec.device_mem, "--threads", str(spec.worker_threads), "--loader", spec.loader,
            "--cache-mem", cache_mem or spec.cache_mem, *link], env)
        devcluster.wait_nodes(self.settings, [node_id], self.layout)

    def stop_node(self, node_id: str) -> None:
        """Stops a node started with ``start_node`` and removes its cache pool."""
        from gpu_runtime.prefetch import PrefetchConfig

        devcluster.stop(self.layout, f"node-{node_id}")
        pool = PrefetchConfig(node_id=f"{self.settings.queue_prefix}{node_id}").pool_path
        Path(pool).unlink(missing_ok=True)
        if node_id in self.extra_nodes:
            self.extra_nodes.remove(node_id)

    def wait_for(self, predicate, timeout_s: float, what: str, every_s: float = 0.2):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(every_s)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def start(layout, database_url: str, store_root, api_port: int, store_port: int,
          model_hosts: tuple[str, ...] = (), policy: str = "hydra",
          spec: dict | None = None, consolidation: bool = True) -> Cluster:
    """The cluster; ``model_hosts`` are http(s) stores registration may read besides the
    cluster's own (a fault-injecting proxy in front of it, say); ``policy`` the scheduler's;
    ``spec`` overrides fields of the nodes' ``ClusterSpec`` (links, device memory)."""
    settings = Settings(database_url=database_url, store_root=str(store_root),
                        admin_key=ADMIN_KEY, api_port=api_port,
                        queue_prefix=f"t{uuid.uuid4().hex[:8]}.",
                        model_hosts=(*Settings().model_hosts, *model_hosts),
                        scheduler_policy=policy, consolidation=consolidation)
    # 12 MiB per device: the tiny models fit whole, llama-small (16 MB) needs two stages.
    nodes = devcluster.ClusterSpec(num_nodes=4, link_mbps=None, device_mem="12MiB",
                                   worker_threads=1, store_port=store_port, cache_mem="64MiB")
    nodes = replace(nodes, **(spec or {}))
    base = devcluster.start_cluster(layout, settings, ADMIN_KEY, nodes)
    return Cluster(base, settings, layout, nodes)


def reference_tokens(model_dir, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of the same model run in this process, one stage, no platform."""
    with LLMEngine(EngineConfig(model=str(model_dir))) as engine:
        engine.add_request("ref", prompt_ids, SamplingParams(max_tokens=max_tokens))
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
    return tokens


@contextlib.contextmanager
def running_cluster(store_root, tmp_path_factory, tag: str,
                    model_hosts: tuple[str, ...] = (), policy: str = "hydra",
                    spec: dict | None = None, consolidation: bool = True) -> Iterator[Cluster]:
    """A migrated throwaway database and a whole local cluster on it, stopped and dropped
    after (and no node cache pool left behind)."""
    from hydraserve.cli.db import drop_database, upgrade
    from tests.conftest import fresh_database_url

    url = fresh_database_url(tag)
    upgrade(url)
    layout = devcluster.Layout(tmp_path_factory.mktemp(tag))
    c = start(layout, url, store_root, free_port(), free_port(), model_hosts, policy, spec,
              consolidation)
    try:
        yield c
    finally:
        for node_id in list(c.extra_nodes):
            c.stop_node(node_id)
        devcluster.stop_cluster(layout, c.spec, c.settings.queue_prefix)
        c.db.dispose()
        drop_database(url)
    assert not list(Path("/dev/shm").glob(f"hydraserve-{c.settings.queue_prefix}*"))
