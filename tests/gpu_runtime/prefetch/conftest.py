"""Fixtures for the prefetcher tests: a small bf16 checkpoint, a store server, prefetchers."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from gpu_runtime.checkpoint import CheckpointIndex, index_checkpoint
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model
from gpu_runtime.prefetch import PrefetchConfig, Prefetcher
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


@pytest.fixture
def make_prefetcher():
    """Builds prefetchers with unique pool files; closes them (and removes the pools) after."""
    made: list[Prefetcher] = []

    def make(**kwargs) -> Prefetcher:
        kwargs.setdefault("pool_bytes", 32 << 20)
        kwargs.setdefault("node_id", f"test-{uuid.uuid4().hex[:8]}")
        pf = Prefetcher(PrefetchConfig(**kwargs))
        made.append(pf)
        return pf

    yield make
    for pf in made:
        pf.close()
        assert pf.pool.mm.closed  # no view left behind: the pool's pages are given back
