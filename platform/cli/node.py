"""``hydraserve node`` and ``hydraserve scheduler``: the long-running cluster processes."""

from __future__ import annotations

import logging
import re

import click

from hydraserve.cluster.service import DeviceSpec
from hydraserve.settings import Settings

UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
         "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size; use e.g. 8GiB, 512MiB or 2000000000")
    return int(float(m.group(1)) * UNITS[m.group(2) or ""])


def parse_devices(text: str, memory: int) -> list[DeviceSpec]:
    """``cpu:2`` -> two CPU devices; ``auto`` -> every CUDA device, else one CPU device."""
    if text == "auto":
        import torch

        if torch.cuda.is_available():
            return [DeviceSpec(i, f"cuda:{torch.cuda.get_device_name(i)}",
                               torch.cuda.get_device_properties(i).total_memory)
                    for i in range(torch.cuda.device_count())]
        text = "cpu:1"
    m = re.fullmatch(r"(cpu|cuda):(\d+)", text)
    if not m or not 1 <= int(m.group(2)) <= 64:
        raise click.BadParameter(f"{text!r}: use auto, cpu:N or cuda:N with N in 1..64")
    return [DeviceSpec(i, m.group(1), memory) for i in range(int(m.group(2)))]


@click.command("node")
@click.option("--node-id", required=True, help="names the node and its queue node.<id>")
@click.option("--devices", default="auto", show_default=True, help="auto, cpu:N or cuda:N")
@click.option("--device-mem", default="8GiB", show_default=True, help="memory per device")
@click.option("--link-mbps", type=click.FloatRange(min=1), default=None,
              help="emulated link cap in megabits per second (default: uncapped)")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="torch threads per worker process")
@click.option("--loader", type=click.Choice(["prefetch", "files"]), default="prefetch",
              show_default=True, help="prefetch: node cache + pre-started workers (zero-copy, "
              "overlapped); files: a fresh process loads from the model's files")
@click.option("--cache-mem", default="256MiB", show_default=True,
              help="shared-memory weight cache of this node (pre-faulted at start)")
@click.option("--prestarted", type=click.IntRange(0, 16), default=1, show_default=True,
              help="generic workers kept booted and idle")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="serve Prometheus /metrics of this node and its workers here (0: a free "
              "port, reported in the node's info)")
def node(node_id: str, devices: str, device_mem: str, link_mbps: float | None,
         threads: int | None, loader: str, cache_mem: str, prestarted: int,
         metrics_port: int | None) -> None:
    """Run a node agent: register, heartbeat, run stage workers placed here."""
    from gpu_runtime.pipeline import prefer_short_spin
    from hydraserve.broker import node_queue
    from hydraserve.tasks.celery_app import celery_app
    from hydraserve.tasks.node.agent import NodeAgent, set_agent

    prefer_short_spin()  # workers start with short OpenMP spins: stages share the cores

    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", node_id):
        raise click.BadParameter(f"{node_id!r}: use 1-63 lower-case letters, digits, '_' or '-'")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings.from_env()
    if metrics_port is not None:  # before any worker starts: they inherit the folder
        from hydraserve.tasks.node.node_metrics import prepare_folder

        prepare_folder(settings.queue_prefix, node_id)
    agent = NodeAgent(settings, node_id, parse_devices(devices, parse_bytes(device_mem)),
                      link_mbps, threads, loader, parse_bytes(cache_mem), prestarted,
                      metrics_port=metrics_port)
    set_agent(agent)
    agent.start()
    try:
        queue = node_queue(node_id, agent.settings.queue_prefix)
        celery_app.worker_main(["worker", "-Q", queue, "--pool", "threads",
                                "--concurrency", "4", "--hostname", f"node-{queue}@%h",
                                "--without-gossip", "--without-mingle", "--without-heartbeat",
                                "--loglevel", "INFO"])
    finally:
        agent.shutdown()


@click.command("scheduler")
def scheduler() -> None:
    """Run the cluster scheduler (one leader; others wait on a Postgres advisory lock)."""
    from hydraserve.scheduler.loop import Scheduler

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    Scheduler(Settings.from_env()).run()
