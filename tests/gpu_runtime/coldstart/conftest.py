"""Fixtures for the cold-start tests: small bf16 checkpoints in a store served over HTTP, their
tensor indexes, and prefetchers with unique pools."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_runtime.checkpoint import CheckpointIndex, index_checkpoint
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model
from gpu_runtime.store.server import running

# init_std 0.2: clear greedy margins, so token equality tests are not decided by rounding
MODELS = {
    "llama": DemoModelSpec("llama", "small", "bfloat16", seed=11, init_std=0.2,
                           shard_bytes=3_000_000),
    "opt": DemoModelSpec("opt", "small", "bfloat16", seed=12, init_std=0.2),
}


@pytest.fixture(scope="session")
def cs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("csstore")
    for name, spec in MODELS.items():
        make_demo_model(root / name, spec)
    return root


@pytest.fixture(scope="session")
def cs_server(cs_root):
    with running(cs_root) as server:
        yield server


@pytest.fixture(scope="session")
def cs_index(cs_server) -> dict[str, CheckpointIndex]:
    """Tensor index (with crc32 checksums) of every model, read through the store server."""
    return {name: index_checkpoint(f"{cs_server.url}/{name}") for name in MODELS}


