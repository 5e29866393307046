"""Pipeline consolidation on stage 0: the pipeline turns into one standalone replica while it
keeps serving (docs/consolidation.md).

    c = Consolidator(engine, whole_spec, buffers_loader(sources))  # or files_loader(model_dir)
    while serving:
        if c.tick() and not released:   # between steps: True once the whole model runs here
            c.release()    # the other stages stop
        engine.step()

1. **Load while serving.** A thread builds the whole model's skeleton on ``meta``, adopts
   stage 0's parameters as they are (no copy), fills the rest from the other stages' bytes
   (zero-copy from the node cache on CPU) and warms it with one forward on a scratch cache.
2. **Live KV migration.** Every stage keeps one block numbering (stage 0's block table), and a
   full block is never written again. Once the model is loaded, each pipeline step carries a
   ``kv_pull`` of up to ``chunk_blocks`` full blocks not copied yet right behind it on the ring
   (every stage appends its layers' keys and values of those blocks), so full blocks move while
   the pipeline keeps decoding. ``BlockManager.epochs`` tells a block reused since its copy.
3. **Switch.** At a step boundary with no full block left to copy (or after ``max_rounds``
   rounds), one last ``kv_pull`` moves what was written since: the last, partial block of each
   running sequence. The engine then runs a ``LocalRunner`` on the whole model and its own KV
   cache; ``release()`` then tells the other stages to stop.

A failed load leaves the pipeline serving (``failed`` says why). Requests that finished before
the switch never move; requests that arrive meanwhile are served by the pipeline, then here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_runtime.attention import AttentionMetadata
from gpu_runtime.channel import Message
from gpu_runtime.errors import DataPlaneError
from gpu_runtime.kv_cache import KVCache, KVCacheSpec
from gpu_runtime.model_runner import LocalRunner, StepBatch
from gpu_runtime.pipeline import PipelineRunner
from gpu_runtime.sampling import Sampled
from gpu_runtime.stage import Stage, StageSpec, build_stage

CHUNK_BLOCKS = 16  # full blocks pulled behind one pipeline step (each pull slows its step)
MAX_ROUNDS = 512  # pre-copy rounds before the switch moves whatever is left

# fills the parameters of the whole model that stage 0 does not hold (``have``: stage 0's HF
# tensor names); returns what must stay alive with the weights (mapped buffers)
RestLoader = Callable[[Stage, Collection[str]], list]


class ConsolidationError(DataPlaneError):
    """The rest of the model could not be loaded, or the pipeline cannot consolidate."""


@dataclass(slots=True)
class ConsolidationStats:
    """What one consolidation did (wall-clock stamps, blocks and bytes moved)."""

    state: str = "loading"  # loading | precopy | consolidated | failed
    load_start: float = 0.0
    load_end: float | None = None
    switched_at: float | None = None
    precopy_rounds: int = 0
    precopy_blocks: int = 0  # blocks (every migrated layer) moved while the pipeline decoded
    precopy_bytes: int = 0
    switch_blocks: int = 0  # blocks moved at the switch
    switch_sequences: int = 0  # running sequences at the switch
    switch_bytes: int = 0
    switch_s: float = 0.0  # the pause at the switch (pull, import, swap)
    migrated_layers: int = 0  # layers whose KV came over the ring
    error: str | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


def whole_spec(stage0: StageSpec, names: Sequence[str], num_layers: int,
               num_bytes: int) -> StageSpec:
    """The ``pp = 1`` spec of the model stage 0 belongs to."""
    assert stage0.is_first, f"stage {stage0.index} is not stage 0"
    return StageSpec(0, 1, 0, num_layers, tuple(names), num_bytes)


def files_loader(model_dir: str | Path) -> RestLoader:
    """Reads the rest from a local checkpoint's safetensors files (one copy)."""
    from gpu_runtime.loader import load_tensors, plan_stages

    def fill(whole: Stage, have: Collection[str]) -> list:
        _, _, files = plan_stages(model_dir, 1)
        load_tensors(whole, model_dir, [n for n in whole.spec.tensor_names if n not in have],
                     files)
        return []

    return fill


def buffers_loader(sources: Sequence[tuple], timeout_s: float | None = 600.0) -> RestLoader:
    """Views the rest in the node cache: ``sources`` holds (BufferHandle, StageLayout) of each
    stage stage 0 lacks, fetched by its node; on CPU each tensor aliases the cache."""
    from gpu_runtime.prefetch import iter_tensors, open_buffer

    def fill(whole: Stage, have: Collection[str]) -> list:
        buffers = []
        for handle, layout in sources:
            buf = open_buffer(handle, populate=True)  # mapped now: no page faults when serving
            buffers.append(buf)
            for name, tensor in iter_tensors(buf, layout, timeout_s):
                whole.load_tensor(name, tensor)
        return buffers

    return fill


def assemble(stage0: Stage, spec: StageSpec, fill_rest: RestLoader) -> tuple[Stage, list]:
    """The whole model: stage 0's parameters adopted, the rest filled by ``fill_rest``."""
    whole = build_stage(stage0.config, spec, stage0.dtype, stage0.device)
    whole.adopt(stage0)
    keep = fill_rest(whole, set(stage0.spec.tensor_names))
    missing = whole.missing()
    if missing:
        raise ConsolidationError(f"{len(missing)} parameters of the whole model were not in "
                                 f"the stages fetched, e.g. {missing[:3]}", "model")
    whole.fuse_projections()  # on CUDA; stage 0's fused weights are viewed, not copied
    return whole, keep


@torch.inference_mode()
def warm_up(stage: Stage, block_size: int) -> None:
    """One forward of a few tokens on a one-block scratch cache: touches every weight and
    kernel before the switch, so the first step after it is not slower."""
    c = stage.config
    kv = KVCache(KVCacheSpec(0, len(stage.spec.layers), 1, block_size, c.num_kv_heads,
                             c.head_dim, stage.dtype), stage.device)
    n = min(4, block_size)
    meta = AttentionMetadata(positions=torch.arange(n, device=stage.device),
                             slot_mapping=torch.arange(n, device=stage.device),
                             block_tables=torch.zeros((1, 1), dtype=torch.long,
                                                      device=stage.device),
                             context_lens=[n], query_lens=[n], block_size=block_size,
                             scratch=kv.scratch)
    h = stage(torch.zeros(n, dtype=torch.long, device=stage.device), meta, kv)
    stage.compute_logits(h[-1:])


@dataclass(slots=True)
class Whole:
    """The whole model loaded beside a stage, with its own KV cache."""

    stage: Stage
    kv: KVCache
    keep: list  # what must stay alive with the weights (mapped buffers)
    load_start: float
    load_end: float


def load_whole(part: Stage, spec: StageSpec, fill_rest: RestLoader, num_blocks: int,
               block_size: int) -> Whole:
    """The whole model around the loaded stage ``part`` (its parameters adopted, the rest from
    ``fill_rest``), warmed, with a KV cache of ``num_blocks`` blocks on every layer."""
    started = time.time()
    whole, keep = assemble(part, spec, fill_rest)
    warm_up(whole, block_size)
    c = part.config
    kv = KVCache(KVCacheSpec(0, len(spec.layers), num_blocks, block_size, c.num_kv_heads,
                             c.head_dim, part.dtype), part.device)
    return Whole(whole, kv, keep, started, time.time())


class WholeLoader:
    """``load_whole`` on a thread, while the stage keeps serving: stage 0's pipeline
    (``Consolidator``) or a later stage's part of the ring (a replica to be)."""

    def __init__(self, part: Stage, spec: StageSpec, fill_rest: RestLoader, num_blocks: int,
                 block_size: int) -> None:
        self.whole: Whole | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="replica-load",
                                        args=(part, spec, fill_rest, num_blocks, block_size))
        self._thread.start()

    def _run(self, *args) -> None:
        try:
            self.whole = load_whole(*args)
        except BaseException as exc:  # noqa: BLE001 - raised by result() in the worker
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Waits for the load to end (loaded or failed); False when it is still running."""
        self._thread.join(timeout_s)
        return self.done()

    def result(self, timeout_s: float | None = None) -> Whole:
        self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        if self.whole is None:
            raise ConsolidationError(f"the whole model was not loaded within {timeout_s} s",
                                     "model")
        return self.whole


class Consolidator:
    """Turns ``engine``'s pipeline into the whole model on this process; see the module doc."""

    def __init__(self, engine, spec: StageSpec, fill_rest: RestLoader, *,
                 chunk_blocks: int = CHUNK_BLOCKS, max_rounds: int = MAX_ROUNDS) -> None:
        if not isinstance(engine.runner, PipelineRunner):
            raise ConsolidationError("the engine runs no pipeline: nothing to consolidate",
                                     "pp")
        self.engine, self.pipeline = engine, engine.runner
        self.spec = spec
        self.chunk_blocks, self.max_rounds = chunk_blocks, max_rounds
        self.stats = ConsolidationStats(load_start=time.time())
        self._copied: dict[int, int] = {}  # block -> its epoch when copied
        kv0 = self.pipeline.kv.spec
        self._loader = WholeLoader(self.pipeline.stage, spec, fill_rest, kv0.num_blocks,
                                   kv0.block_size)
        engine.runner = _MigratingRunner(self)

    @property
    def consolidated(self) -> bool:
        return self.stats.state == "consolidated"

    @property
    def failed(self) -> bool:
        return self.stats.state == "failed"

    def wait_loaded(self, timeout_s: float | None = None) -> bool:
        return self._loader.wait(timeout_s)

    def _loaded(self) -> Whole | None:
        """The whole model once loaded (the state moves on to ``precopy``), else None."""
        whole = self._loader.whole
        if whole is not None and self.stats.state == "loading":
            self.stats.state, self.stats.load_end = "precopy", whole.load_end
        return whole

    def tick(self) -> bool:
        """Between steps: switches once the model is loaded and the pre-copy has caught up;
        True once consolidated. After a failed load the pipeline stays (``failed``)."""
        if self.stats.state in ("consolidated", "failed"):
            return self.consolidated
        if not self._loader.done():
            return False
        if self._loader.error is not None:  # the pipeline keeps serving
            self._give_up(self._loader.error)
            return False
        self._loaded()
        if self._pending(full_only=True) and self.stats.precopy_rounds < self.max_rounds:
            return False  # the next steps carry more full blocks
        self._switch()
        return True

    def _give_up(self, exc: BaseException) -> None:
        self.stats.state = "failed"
        self.stats.error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
        self.engine.runner = self.pipeline

    def _pending(self, full_only: bool) -> list[int]:
        """Blocks of running sequences not copied at their current epoch: the full ones
        (``full_only``) or every block holding KV (at the switch)."""
        blocks = self.engine.blocks
        bs, out, seen = blocks.block_size, [], set()
        for seq in self.engine.scheduler.running:
            if not blocks.has(seq.seq_id):
                continue
            n = seq.num_cached // bs if full_only else -(-seq.num_cached // bs)
            for b in blocks.block_table(seq.seq_id)[:n]:
                if b not in seen and self._copied.get(b) != blocks.epochs[b]:
                    seen.add(b)
                    out.append(b)
        return out

    def _import(self, ids: list[int], msg: Message) -> int:
        """Writes the pulled blocks (and stage 0's own layers of them) into the whole model's
        cache; returns the bytes that came over the ring."""
        whole = self._loaded()
        assert whole is not None, "KV imported before the whole model was loaded"
        kv0, data = self.pipeline.kv, whole.kv.data
        index = torch.tensor(ids, dtype=torch.long, device=data.device)
        start, end = kv0.spec.layer_start, kv0.spec.layer_start + kv0.spec.num_layers
        data[start:end].index_copy_(2, index, kv0.data.index_select(2, index))
        moved = 0
        for s in range(1, self.pipeline.stage.spec.num_stages):
            part = msg.tensors[f"kv{s}"]
            data[end:end + part.shape[0]].index_copy_(2, index, part.to(data.device, data.dtype))
            end += part.shape[0]
            moved += part.nbytes
        assert end == len(self.spec.layers), f"pulled KV covers {end} of "\
            f"{len(self.spec.layers)} layers"
        self.stats.migrated_layers = end - kv0.spec.num_layers
        epochs = self.engine.blocks.epochs
        for b in ids:
            self._copied[b] = epochs[b]
        return moved

    def precopy(self, step: StepBatch) -> Sampled:
        """One pipeline step with up to ``chunk_blocks`` full blocks pulled right behind it."""
        ids = self._pending(full_only=True)[:self.chunk_blocks] if self._loaded() else []
        if not ids:
            return self.pipeline.execute(step)
        sampled, back = self.pipeline.execute_then(step, Message("kv_pull", {"blocks": ids}))
        assert back is not None
        self.stats.precopy_bytes += self._import(ids, back)
        self.stats.precopy_blocks += len(ids)
        self.stats.precopy_rounds += 1
        return sampled

    def _switch(self) -> None:
        whole = self._loaded()
        assert whole is not None, "switch before the whole model was loaded"
        started = time.perf_counter()
        ids = self._pending(full_only=False)
        if ids:
            back = self.pipeline.request(Message("kv_pull", {"blocks": ids}))
            self.stats.switch_bytes = self._import(ids, back)
        s = self.stats
        s.switch_blocks, s.switch_sequences = len(ids), len(self.engine.scheduler.running)
        self.engine.runner = LocalRunner(whole.stage, whole.kv)
        self.engine.kv = whole.kv
        self.engine.specs = [whole.stage.spec]
        s.switch_s = time.perf_counter() - started
        s.switched_at, s.state = time.time(), "consolidated"

    def release(self) -> threading.Thread:
        """After the switch: stops the other stages (they are told on the ring and exit), on a
        thread, off the serving loop's critical path. The caller first records that their exit
        is a release, not a failure."""
        assert self.consolidated, f"release before the switch (state {self.stats.state})"
        t = threading.Thread(target=self.pipeline.close, args=({"consolidated": True},),
                             daemon=True, name="pipeline-close")
        t.start()
        return t


class _MigratingRunner:
    """The engine's runner while consolidating: the pipeline (every other attribute, ``close``
    included), with pre-copy behind steps."""

    def __init__(self, c: Consolidator) -> None:
        self.c = c

    def execute(self, step: StepBatch) -> Sampled:
        return self.c.precopy(step)

    def __getattr__(self, name: str):
        return getattr(self.c.pipeline, name)
