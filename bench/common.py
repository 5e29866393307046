"""Helpers shared by the benchmarks: environment facts, a Markdown table, the JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

KEY = "bench-admin-key-0123456789"  # the admin key of the clusters the benchmarks start


def environment() -> dict:
    """Facts a reader needs to compare figures between runs."""
    import torch

    return {
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
        "load_avg_1m": os.getloadavg()[0],
    }


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def markdown_table(rows: list[dict], columns: list[str], floatfmt: str = "{:.2f}") -> str:
    """Rows of dicts -> a Markdown table over ``columns`` (missing cells left empty)."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return floatfmt.format(v)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path | None, data: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def start_cluster(root: Path, model_dir: Path, num_nodes: int = 1, device_mem: str = "1GiB",
                  devices: str = "cpu:1"):
    """A real local cluster (gunicorn API, scheduler, store, ``num_nodes`` node agents) on a
    database and queue prefix of its own, serving models from ``model_dir``'s folder; returns
    (API base URL, handle for ``stop_cluster``)."""
    from gpu_runtime.ports import free_port
    from hydraserve import devcluster
    from hydraserve.cli.db import create_database, upgrade
    from hydraserve.settings import Settings

    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/hydraserve_bench_{uuid.uuid4().hex[:8]}"
    create_database(url)
    upgrade(url)
    settings = Settings(database_url=url, store_root=str(model_dir.parent), admin_key=KEY,
                        api_port=free_port(), queue_prefix=f"b{uuid.uuid4().hex[:6]}.")
    spec = devcluster.ClusterSpec(num_nodes=num_nodes, link_mbps=None, device_mem=device_mem,
                                  worker_threads=1, store_port=free_port(), devices=devices)
    layout = devcluster.Layout(root)
    base = devcluster.start_cluster(layout, settings, KEY, spec)
    return base, (layout, spec, url, settings.queue_prefix)


def stop_cluster(handle) -> None:
    from hydraserve import devcluster
    from hydraserve.cli.db import drop_database

    layout, spec, url, prefix = handle
    devcluster.stop_cluster(layout, spec, prefix)
    drop_database(url)


def in_child(target: Callable, args: tuple, what: str, join_s: float = 60.0):
    """Runs ``target(conn, *args)`` in a spawned process (a fresh interpreter: nothing of this
    one's memory or CUDA state) and returns the one object it sends on ``conn``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, conn = ctx.Pipe()
    proc = ctx.Process(target=target, args=(conn, *args), daemon=True)
    proc.start()
    conn.close()
    try:
        result = parent.recv()
    except EOFError as exc:
        raise RuntimeError(f"{what} process died (exit {proc.exitcode})") from exc
    proc.join(join_s)
    return result
