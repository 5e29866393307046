"""A cold start under the ``sequential`` policy (scheduler/policies.py), the serverless-vLLM
baseline: the node downloads the whole checkpoint over its link into a fresh directory, and
only then starts a fresh worker process that loads it from the files and serves. Nothing is
cached for the next start and nothing overlaps: fetch, then init and load, then serve."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from gpu_runtime.store.link import FetchStats, NodeLink
from hydraserve.tasks.node.assignment import Assignment
from hydraserve.tasks.node.model_cache import fresh_copy


def download(a: Assignment, link: NodeLink, scratch: Path) -> tuple[Path, dict]:
    """Downloads ``a``'s checkpoint into ``scratch``; returns its directory and the fetch's
    phases for the instance's timeline."""
    dest = scratch / f"instance-{a.instance_id}"
    shutil.rmtree(dest, ignore_errors=True)  # a redelivered start task begins again
    start = time.time()
    moved = fresh_copy(a.model_uri, list(a.weight_files), dest, link.throttle)
    end = time.time()
    link.record(FetchStats(moved, end - start, num_connections=1))
    return dest, {"plan": a.plan_time, "fetch_start": start, "fetch_end": end,
                  "fetch_bytes": moved, "cache_hit": False, "prestarted": False}


def remove(dest: Path | None) -> None:
    """Drops a start's copy once its worker is gone."""
    if dest is not None:
        shutil.rmtree(dest, ignore_errors=True)
