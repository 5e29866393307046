"""CUDA graphs of a whole model's decode step (pp = 1), one per batch size in ``SIZES``.

A decode step of a few sequences launches hundreds of small kernels; on a GPU their launch
cost is a large part of the step. A graph replays them all with one launch. The graph reads
its inputs from static buffers (token ids, positions, slots, block tables, context lengths),
so a step copies its inputs into them (host to device, non-blocking) and replays; the logits
land in a static output the sampler reads before the next replay.

When: the first decode step of a batch size runs eagerly (Triton compiles its kernel, the
allocator warms), the second runs eagerly on the static buffers (its logits are the step's)
and is then captured (recording runs nothing), every later one replays. So capture happens
while the instance serves, after its first token: never on the cold start's critical path
(capturing needs the loaded weights, and a warm-up before the first request would write k/v
into the cache's blocks). ``HYDRA_CUDA_GRAPHS=0`` turns graphs off; a capture that fails turns
them off for the runner, logged once, and the step runs eagerly.

What a graph can hold: the decode path must read no tensor value on the host and take no
shape from the context lengths. That is the CUDA backend's Triton decode attention
(``backends/triton_decode.py``); with the torch fallback (gathered contexts of the step's
longest length), with a sliding window, or with anything but one token per sequence and one
sample each, the step runs eagerly.

``DecodeGraphs(stage, kv, capture=...)``: ``capture`` is the recorder; the default records a
``torch.cuda.CUDAGraph``. Tests pass one that runs the step once to record it and replays it by
running it again on the static buffers, which checks everything but the CUDA capture itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpu_runtime import devices
from gpu_runtime.attention import AttentionMetadata
from gpu_runtime.kv_cache import KVCache
from gpu_runtime.stage import Stage

log = logging.getLogger(__name__)

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # batch sizes with a graph: the common decode batches

Replay = Callable[[], None]
Capture = Callable[[Callable[[], None]], Replay]


def enabled() -> bool:
    """Whether decode graphs are on (``HYDRA_CUDA_GRAPHS``, default on)."""
    return os.environ.get("HYDRA_CUDA_GRAPHS", "1") != "0"


def cuda_capture(device: torch.device) -> Capture:
    """Records ``run`` into a CUDA graph (sharing one memory pool across sizes) and returns
    its replay."""
    pool = torch.cuda.graph_pool_handle()

    def capture(run: Callable[[], None]) -> Replay:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(device)
        with torch.cuda.graph(graph, pool=pool):
            run()
        return graph.replay

    return capture


@dataclass(slots=True)
class _Static:
    """One batch size's static inputs, its metadata and (once captured) its replay."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    tables: torch.Tensor
    context_lens: torch.Tensor
    meta: AttentionMetadata
    logits: torch.Tensor | None = None
    replay: Replay | None = None


class DecodeGraphs:
    """Decode graphs of one whole-model stage and its KV cache."""

    def __init__(self, stage: Stage, kv: KVCache, capture: Capture | None = None,
                 sizes: tuple[int, ...] = SIZES) -> None:
        assert stage.spec.is_first and stage.spec.is_last, "decode graphs need the whole model"
        self.stage, self.kv, self.sizes = stage, kv, sizes
        self._capture = capture or cuda_capture(stage.device)
        self._seen: set[int] = set()
        self._static: dict[int, _Static] = {}
        self.disabled: str | None = None  # why graphs are off, once they are
        self.counts = {"eager": 0, "captured": 0, "replayed": 0}

    def applies(self, step) -> bool:
        """A decode step (one token per sequence, one sample each, no block copies) of a
        batch size that has a graph."""
        return (self.disabled is None and len(step.query_lens) in self.sizes
                and max(step.query_lens) == 1 and step.num_samples is None
                and not step.block_copies)

    def logits(self, step) -> torch.Tensor | None:
        """The step's logits (rows, vocab) through a graph, or None: run it eagerly."""
        if not self.applies(step):
            return None
        batch = len(step.query_lens)
        if batch not in self._seen:  # the first time: eagerly, as any step
            self._seen.add(batch)
            self.counts["eager"] += 1
            return None
        static = self._static.get(batch) or self._new_static(batch)
        self._fill(static, step)
        if static.replay is None:
            return self._capture_now(batch, static)
        static.replay()
        self.counts["replayed"] += 1
        return static.logits

    def _capture_now(self, batch: int, static: _Static) -> torch.Tensor | None:
        logits = self._forward(static)  # the step itself, eagerly on the static buffers

        def record() -> None:
            # recording allocates the output (in the graph's pool, where every replay writes
            # it); a recorder that re-runs Python instead (the tests') writes it in place
            out = self._forward(static)
            if static.logits is None:
                static.logits = out
            else:
                static.logits.copy_(out)

        try:
            static.replay = self._capture(record)
            assert static.logits is not None, "the capture recorded no output"
        except Exception as exc:  # noqa: BLE001 - graphs are an optimisation: fall back
            self.disabled = f"capture of batch {batch} failed: {type(exc).__name__}: {exc}"
            log.warning("decode graphs off: %s", self.disabled)
            self._static.pop(batch, None)
            return logits
        self._static[batch] = static
        self.counts["captured"] += 1
        return logits

    def _forward(self, static: _Static) -> torch.Tensor:
        h = self.stage(static.ids, static.meta, self.kv)
        return self.stage.compute_logits(h)

    def _new_static(self, batch: int) -> _Static:
        device, spec = self.stage.device, self.kv.spec
        width = spec.num_blocks  # the widest table a sequence can have

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        ids, positions, slots = zeros(batch), zeros(batch), zeros(batch)
        tables, context_lens = zeros(batch, width), zeros(batch)
        # the Python lists stand for any decode step of this size: one query token each; the
        # context lengths the kernels read are the tensor's (no host value in the graph)
        meta = AttentionMetadata(positions=positions, slot_mapping=slots, block_tables=tables,
                                 context_lens=[1] * batch, query_lens=[1] * batch,
                                 block_size=spec.block_size, scratch=self.kv.scratch,
                                 host_block_tables=torch.zeros(batch, 1, dtype=torch.long),
                                 context_lens_tensor=context_lens,
                                 checked_cache=(spec.num_blocks, spec.block_size))
        return _Static(ids, positions, slots, tables, context_lens, meta)

    @staticmethod
    def _fill(static: _Static, step) -> None:
        """Copies the step's inputs into the static buffers (non-blocking from pinned memory
        on CUDA); block-table columns past the step's width keep stale ids, which no kernel
        reads (each reads its sequence's first ceil(context / block_size) entries)."""
        put = devices.copy_into
        put(static.ids, step.input_ids)
        put(static.positions, step.positions)
        put(static.slots, step.slot_mapping)
        put(static.tables[:, :step.block_tables.shape[1]], step.block_tables)
        put(static.context_lens, torch.tensor(step.context_lens, dtype=torch.long))
