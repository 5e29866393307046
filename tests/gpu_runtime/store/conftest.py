"""Fixtures for the model-store tests: one small bf16 sharded checkpoint and a store server."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_runtime.checkpoint import CheckpointIndex, index_checkpoint
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model
from gpu_runtime.store.server import serve


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    """A store root holding ``small/`` (bf16, about 7.9 MB in 5 shards)."""
    root = tmp_path_factory.mktemp("store")
    make_demo_model(root / "small", DemoModelSpec(size="small", dtype="bfloat16",
                                                  shard_bytes=2_000_000))
    return root


@pytest.fixture(scope="session")
def ckpt_index(ckpt_root) -> CheckpointIndex:
    return index_checkpoint(f"file://{ckpt_root / 'small'}")


@pytest.fixture
def store_server(ckpt_root):
    server = serve(ckpt_root, port=0, background=True)
    yield server
    server.shutdown()
    server.server_close()
