"""Fixtures for the prefetcher tests: a small bf16 checkpoint, a store server, prefetchers."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_runtime.checkpoint import CheckpointIndex, index_checkpoint
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model
from gpu_runtime.store.server import serve


@pytest.fixture(scope="session")
def pf_root(tmp_path_factory) -> Path:
    """A store root holding ``small/`` (bf16, about 7.9 MB in 5 shards)."""
    root = tmp_path_factory.mktemp("pfstore")
    make_demo_model(root / "small", DemoModelSpec(size="small", dtype="bfloat16",
                                                  shard_bytes=2_000_000))
    return root


@pytest.fixture(scope="session")
def pf_index(pf_root) -> CheckpointIndex:
    return index_checkpoint(f"file://{pf_root / 'small'}")


@pytest.fixture
def pf_server(pf_root):
    server = serve(pf_root, port=0, background=True)
    yield server
    server.shutdown()
    server.server_close()


