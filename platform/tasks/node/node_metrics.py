"""A node agent's /metrics: its serving workers' samples (prometheus_client's multiprocess mode:
every worker writes to one folder of this node) and the node's own state, read at each scrape.

``hydraserve node --metrics-port N`` serves it (0: a free port, reported in the node's
heartbeat info as ``metrics_port``); docs/metrics.md lists the metrics."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import mark_process_dead

from hydraserve.metrics import multiprocess_registry


def prepare_folder(queue_prefix: str, node_id: str) -> str:
    """Sets PROMETHEUS_MULTIPROC_DIR for the workers this process will start (they inherit it)
    and empties it: samples of an earlier agent's workers are not this one's."""
    root = os.environ.get("HYDRA_METRICS_DIR") or tempfile.gettempdir()
    path = os.path.join(root, f"hydraserve-node-{queue_prefix}{node_id}")  # one per node
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    return path


def worker_exited(pid: int) -> None:
    """Drops a dead worker's live gauges (running, waiting, KV use)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        mark_process_dead(pid, path)


class NodeCollector:
    """The agent's own numbers, from its heartbeat info at scrape time."""

    def __init__(self, agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        info = self.agent.info()
        node = [self.agent.node_id]
        gauges = [("hydraserve_node_workers", "Serving workers the agent runs", info["workers"]),
                  ("hydraserve_node_idle_workers", "Pre-started workers booted and idle",
                   info["idle_workers"]),
                  ("hydraserve_node_cached_stages", "Model stages held in the node cache",
                   len(info["cached_stages"]))]
        counters = []
        cs = self.agent.coldstart
        if cs is not None:  # a prefetch node: its cache pool and its link
            pf = cs.prefetcher
            gauges += [("hydraserve_node_cache_bytes", "Size of the node cache pool",
                        pf.pool.config.size_bytes),
                       ("hydraserve_node_cache_free_bytes", "Free bytes of the node cache pool",
                        pf.pool.free_bytes)]
            gauges.append(("hydraserve_node_link_bytes_per_second", "Achieved throughput of "
                           "the node's last (up to 8) network fetches",
                           pf.link.recent_rate() or 0.0))
            counters += [("hydraserve_node_link_bytes", "Bytes fetched over the network",
                          pf.link.total_bytes)]
            counters += [(f"hydraserve_node_cache_{k}", f"Node cache lookups and entries: {k}",
                          v) for k, v in pf.cache.counters.items()]
        for name, help_text, value in gauges:
            family = GaugeMetricFamily(name, help_text, labels=["node"])
            family.add_metric(node, value)
            yield family
        for name, help_text, value in counters:
            counter = CounterMetricFamily(name, help_text, labels=["node"])
            counter.add_metric(node, value)
            yield counter


def serve(agent, port: int, host: str) -> int:
    """Starts the endpoint in a thread; returns the port it listens on."""
    registry = multiprocess_registry()
    registry.register(NodeCollector(agent))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port
