"""What a node is told for one stage of a cold start, and what a worker is handed.

``plan_group`` turns a checkpoint's tensor index (recorded at registration) into one
``StagePlan`` per stage: the stage spec, the tensor entries its node prefetches, the channel
addresses of the ring and the KV block count every stage shares. A node turns its ``StagePlan``
plus the prefetch job into a ``StageAssignment`` for a worker (``launch.launch_stage``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpu_runtime.checkpoint import CheckpointIndex, TensorEntry
from gpu_runtime.coldstart.errors import AssignmentError
from gpu_runtime.coldstart.handoff import StageServer, check_server
from gpu_runtime.coldstart.stream import stage_entries
from gpu_runtime.config import DTYPES, parse_config
from gpu_runtime.devices import DeviceName, DeviceNameError
from gpu_runtime.kv_cache import blocks_for_budget
from gpu_runtime.pipeline import ipc_addresses
from gpu_runtime.prefetch import BufferHandle
from gpu_runtime.stage import StageSpec, split_stages
from gpu_runtime.store.ranges import StageLayout


@dataclass(frozen=True, slots=True)
class EngineShape:
    """Engine settings every stage of a group must agree on."""

    dtype: str | None = None  # None: the checkpoint's own dtype
    num_kv_blocks: int = 256
    block_size: int = 16
    num_threads: int | None = None  # torch intra-op threads in the worker

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise AssignmentError(f"dtype {self.dtype!r} is not supported; allowed "
                                  f"{tuple(DTYPES)}", "dtype")
        if self.num_kv_blocks < 1 or not 1 <= self.block_size <= 1024:
            raise AssignmentError(f"num_kv_blocks={self.num_kv_blocks} must be >= 1 and "
                                  f"block_size={self.block_size} in 1..1024", "num_kv_blocks")


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One stage of a planned cold start: everything its node needs, nothing node-specific."""

    model: str  # the model's name in the cache and the timeline
    uri: str  # checkpoint URI in the store (config and tokenizer are read from it)
    config: dict  # the checkpoint's config.json, as recorded at registration
    spec: StageSpec
    entries: tuple[TensorEntry, ...]  # this stage's tensors (the prefetch)
    addresses: tuple[str, ...]  # channel address of every stage (empty when pp = 1)
    engine: EngineShape
    plan_time: float  # wall clock of the scheduler's decision
    # Stage 0 only: what takes over once the engine is up, instead of serving the pool's pipe
    # (the platform's request loop; see handoff.py). Its ``prepare`` runs while the stage loads.
    server: StageServer | None = None
    # A later stage with a full share: what serves requests once its pipeline consolidated
    # and it stands alone as a replica (docs/consolidation.md); prepared only then.
    replica: StageServer | None = None
    # Where the stage runs (a name of gpu_runtime/devices.py: cpu, cpu:N, cuda:N) and the
    # device memory its share allows (0: no cap); the worker binds itself to both
    device: str = "cpu"
    memory_bytes: int = 0
    cap_memory: bool = True  # False: the KV cache was sized past the share (see assignment)

    def __post_init__(self) -> None:
        pp = self.spec.num_stages
        if pp > 1 and len(self.addresses) != pp:
            raise AssignmentError(f"a pp={pp} stage needs {pp} channel addresses (one per "
                                  f"stage), got {len(self.addresses)}", "addresses")
        if not self.entries:
            raise AssignmentError(f"stage {self.spec.index} has no tensors to fetch", "stage")
        if self.server is not None:
            if not self.spec.is_first:
                raise AssignmentError(f"stage {self.spec.index} got a stage server; only "
                                      "stage 0 serves requests", "server")
            check_server(self.server)
        try:
            DeviceName.parse(self.device)
        except DeviceNameError as exc:
            raise AssignmentError(str(exc), "device") from None
        if self.memory_bytes < 0:
            raise AssignmentError(f"memory_bytes={self.memory_bytes}; must be >= 0 (0: no cap)",
                                  "memory_bytes")
        if self.replica is not None:
            if self.spec.is_first:
                raise AssignmentError("stage 0 serves requests already (server); a replica "
                                      "server is for a later stage", "replica")
            check_server(self.replica)

    @property
    def pp(self) -> int:
        return self.spec.num_stages

    @property
    def cache_stage(self) -> str:
        """The stage's name in the node cache, e.g. ``pp4-s2``."""
        return f"pp{self.pp}-s{self.spec.index}"

    @property
    def fetch_bytes(self) -> int:
        return sum(e.length for e in self.entries)


@dataclass(frozen=True, slots=True)
class StageAssignment:
    """What a worker process receives: a stage plan plus the node's buffer for it."""

    plan: StagePlan
    node: str
    handle: BufferHandle
    layout: StageLayout

    def __post_init__(self) -> None:
        if self.handle.layout_digest != self.layout.digest():
            raise AssignmentError(f"buffer {self.handle.key} was filled with layout "
                                  f"{self.handle.layout_digest}, the assignment carries "
                                  f"{self.layout.digest()}", "layout")


def kv_blocks(index: CheckpointIndex, specs: Sequence[StageSpec], kv_cache_bytes: int,
              block_size: int, dtype: str | None, whole_model: bool = False) -> int:
    """Blocks that fit ``kv_cache_bytes`` on the stage with the most layers (all stages share
    one block numbering, as the engine does); ``whole_model``: on every layer at once, so the
    block numbering survives consolidation into the whole model on one share."""
    config = parse_config(index.config)
    torch_dtype: torch.dtype = DTYPES[dtype or config.torch_dtype]
    layers = [config.num_layers] if whole_model else [len(s.layers) for s in specs]
    return blocks_for_budget(kv_cache_bytes, layers, block_size, config.num_kv_heads,
                             config.head_dim, torch_dtype, AssignmentError)


def plan_group(model: str, index: CheckpointIndex, pp: int, *, kv_cache_bytes: int = 256 << 20,
               block_size: int = 16, dtype: str | None = None, num_threads: int | None = None,
               addresses: Sequence[str] | None = None, uri: str | None = None,
               plan_time: float | None = None, kv_whole_model: bool = False) -> list[StagePlan]:
    """One ``StagePlan`` per stage of a ``pp``-stage cold start of ``index``'s checkpoint.

    ``addresses`` defaults to ``ipc://`` paths (one machine); give ``tcp://host:port`` ones
    when stages run on different hosts. ``uri`` defaults to the index's own URI.
    ``kv_whole_model``: ``kv_cache_bytes`` holds the blocks on every layer (a group that will
    consolidate; see ``kv_blocks``).
    """
    config = parse_config(index.config)
    # frozen TensorEntry fields are read-only, which mypy's Protocol check does not accept
    specs = split_stages(config, index.tensors, pp)  # type: ignore[arg-type]
    blocks = kv_blocks(index, specs, kv_cache_bytes, block_size, dtype, kv_whole_model)
    shape = EngineShape(dtype, blocks, block_size, num_threads)
    addrs = tuple(addresses) if addresses is not None else (
        tuple(ipc_addresses(pp)) if pp > 1 else ())
    when = time.time() if plan_time is None else plan_time
    return [StagePlan(model, uri or index.uri, index.config, spec,
                      tuple(stage_entries(index.tensors, spec)), addrs, shape, when)
            for spec in specs]
