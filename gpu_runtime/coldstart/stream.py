"""The streaming loader: a stage skeleton on ``meta``, filled tensor by tensor from the node's
shared-memory cache as the prefetcher's progress mark passes each tensor.

    buffer = open_buffer(handle)
    loaded = stream_stage(config, spec, buffer, layout, torch.bfloat16, "cpu")

On CPU, when the checkpoint dtype is the stage dtype, every parameter aliases the cache (the
weights are never copied: N workers on a node share one physical copy). On CUDA each tensor is
copied once into device memory on several streams, by DMA from the cache itself once the driver
has page-locked the buffer's mapping, or through pinned staging slots when it would not
(``cuda_copy``; ``LoadStats.h2d`` says which). No state_dict is built: at most one tensor is in
hand at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from gpu_runtime.checkpoint import TensorEntry
from gpu_runtime.coldstart.cuda_copy import (
    CopyConfig,
    Driver,
    StreamCopier,
    open_copier,
    span_of,
)
from gpu_runtime.coldstart.errors import StageLoadError
from gpu_runtime.config import ModelConfig
from gpu_runtime.prefetch import SharedBuffer, iter_tensors
from gpu_runtime.stage import Stage, StageSpec, build_stage
from gpu_runtime.store.ranges import StageLayout

# on_tensor(name, tensor as loaded, seconds since the load began)
TensorCallback = Callable[[str, torch.Tensor, float], None]


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """How long to wait for each tensor's bytes, and the CUDA copy path's settings."""

    tensor_timeout_s: float | None = 600.0  # per tensor; None waits forever
    copy: CopyConfig = field(default_factory=CopyConfig)

    def __post_init__(self) -> None:
        if self.tensor_timeout_s is not None and self.tensor_timeout_s <= 0:
            raise ValueError(f"tensor_timeout_s must be > 0 or None, got {self.tensor_timeout_s}")


@dataclass(slots=True)
class LoadStats:
    """What one streaming load did: tensors, bytes, how many aliased the cache, waits."""

    num_tensors: int = 0
    num_bytes: int = 0
    aliased_bytes: int = 0  # bytes whose parameters view the cache (no copy at all)
    copied_bytes: int = 0  # bytes copied once (to the device, or to convert the dtype)
    wait_s: float = 0.0  # time spent waiting on the progress mark
    started: float = 0.0  # wall clock
    first_tensor: float | None = None
    load_end: float | None = None
    # the host-to-device path on CUDA: "registered" or "staged: <why>" (None on CPU)
    h2d: str | None = None
    h2d_setup_s: float = 0.0  # choosing it: registering the mapping, or trying to

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class LoadedStage:
    """A loaded stage and the buffer its parameters may alias: keep both alive together."""

    stage: Stage
    buffer: SharedBuffer
    stats: LoadStats


def stage_entries(tensors: Sequence[TensorEntry], spec: StageSpec) -> list[TensorEntry]:
    """The index entries of ``spec``'s tensors: what the node prefetches for this stage."""
    wanted = set(spec.tensor_names)
    entries = [t for t in tensors if t.name in wanted]
    missing = wanted - {t.name for t in entries}
    if missing:
        raise StageLoadError(f"stage {spec.index}: tensors {sorted(missing)[:5]} are not in the "
                             "tensor index; re-index the checkpoint", "model")
    return entries


def _timed(it: Iterator[tuple[str, torch.Tensor]], stats: LoadStats
           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Adds the time spent inside ``next`` (waiting on the mark) to ``stats.wait_s``."""
    while True:
        before = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        stats.wait_s += time.perf_counter() - before
        yield item


def stream_into(stage: Stage, buffer: SharedBuffer, layout: StageLayout,
                config: StreamConfig = StreamConfig(),
                on_tensor: TensorCallback | None = None,
                driver: Driver | None = None) -> LoadStats:
    """Fills ``stage`` from ``buffer`` in buffer order, each tensor as soon as it is verified.

    Raises the prefetcher's typed error if the fetch fails, ``StageLoadError`` if a parameter
    of the stage was never in the buffer. ``driver``: the CUDA runtime calls of the copier
    (tests); None is the real one.
    """
    stats = LoadStats(started=time.time())
    t0 = time.perf_counter()
    copier = None
    if stage.device.type == "cuda":
        copier = open_copier(stage.device, config.copy,
                             span_of(buffer.address, buffer.handle.size), driver)
        stats.h2d_setup_s = time.perf_counter() - t0
    try:
        _load_all(stage, buffer, layout, config, on_tensor, stats, copier, t0)
    finally:
        if copier is not None:
            copier.close()  # the copies end before the mapping is unregistered
            stats.h2d = copier.path
    missing = stage.missing()
    if missing:
        raise StageLoadError(f"stage {stage.spec.index}: {len(missing)} parameters were not in "
                             f"buffer {buffer.handle.key}, e.g. {missing[:3]}; the prefetch and "
                             "the stage were planned from different splits", "stage")
    stage.fuse_projections()  # on CUDA: q/k/v and gate/up, one projection each
    stats.load_end = time.time()
    return stats


def _load_all(stage: Stage, buffer: SharedBuffer, layout: StageLayout, config: StreamConfig,
              on_tensor: TensorCallback | None, stats: LoadStats, copier: StreamCopier | None,
              t0: float) -> None:
    """Every tensor of ``buffer`` into ``stage``, through ``copier`` on CUDA."""
    for name, tensor in _timed(iter_tensors(buffer, layout, config.tensor_timeout_s), stats):
        aliased = copier is None and tensor.dtype == stage.dtype
        if copier is not None:
            tensor = copier.to_device(tensor, wait=tensor.dtype != stage.dtype)
        stage.load_tensor(name, tensor)
        stats.num_tensors += 1
        stats.num_bytes += tensor.nbytes
        stats.aliased_bytes += tensor.nbytes if aliased else 0
        stats.copied_bytes += 0 if aliased else tensor.nbytes
        if stats.first_tensor is None:
            stats.first_tensor = time.time()
        if on_tensor is not None:
            on_tensor(name, tensor, time.perf_counter() - t0)
    if copier is not None:
        copier.finish()


def stream_stage(config: ModelConfig, spec: StageSpec, buffer: SharedBuffer,
                 layout: StageLayout, dtype: torch.dtype, device: torch.device | str = "cpu",
                 stream_config: StreamConfig = StreamConfig(),
                 on_tensor: TensorCallback | None = None) -> LoadedStage:
    """Builds ``spec``'s skeleton on ``meta`` and streams its parameters from ``buffer``."""
    stage = build_stage(config, spec, dtype, device)
    stats = stream_into(stage, buffer, layout, stream_config, on_tensor)
    return LoadedStage(stage, buffer, stats)
