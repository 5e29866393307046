"""Runtime init that overlaps the fetch, and serving a stage that was loaded by streaming.

``RuntimeInit`` is a thread the worker starts as soon as it has an assignment: it allocates the
KV cache, loads the tokenizer and binds the stage's channel while the main thread streams weights
(imports and the device context were done when the worker process started). ``engine_for`` and
``PreparedStageWorker`` then serve the loaded stage with the engine's own classes.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from gpu_runtime import native
from gpu_runtime.channel import Channel, Message
from gpu_runtime.checkpoint import Source
from gpu_runtime.coldstart.plan import StagePlan
from gpu_runtime.config import ModelConfig
from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.kv_cache import KVCache, KVCacheSpec
from gpu_runtime.model_runner import LocalRunner
from gpu_runtime.pipeline import PipelineRunner, StageWorker
from gpu_runtime.stage import Stage
from gpu_runtime.tokenizer import TOKENIZER_FILES, Tokenizer


def warm_meta() -> None:
    """Builds a tiny module on ``meta`` once: the first random init on ``meta`` imports
    ``torch._dynamo`` (about 1-2 s here), a cost a worker should pay at boot, not per stage."""
    with torch.device("meta"):
        torch.nn.Embedding(4, 4)
        torch.nn.Linear(4, 4)


def init_device(device: torch.device, num_threads: int | None = None) -> float:
    """Creates the device context (CUDA) or warms the CPU kernels, and warms the ``meta``
    skeleton path; returns seconds taken."""
    started = time.perf_counter()
    warm_meta()
    if num_threads:
        torch.set_num_threads(num_threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.init()
        torch.ones(1, device=device).sum().item()  # forces the context and the allocator
        # the pinned staging slots, where loads will need them, are made now, not during a
        # cold start
        from gpu_runtime.coldstart.cuda_copy import prepare_staging

        prepare_staging(device)
    else:
        a = torch.ones(64, 64)
        (a @ a).sum().item()  # loads the BLAS kernels
        native.load()  # and ours: hashed, opened (built, if make venv did not) before a stage
    return time.perf_counter() - started


def load_tokenizer(uri: str) -> Tokenizer | None:
    """The checkpoint's tokenizer, read from the store (None when it has no tokenizer.json)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Tokenizer.maybe(Path(unquote(parsed.path)))
    source = Source(uri)
    if not source.exists(TOKENIZER_FILES[0]):
        return None
    tmp = Path(tempfile.mkdtemp(prefix="hydra-tok-"))
    for name in TOKENIZER_FILES:
        if source.exists(name):
            (tmp / name).write_bytes(source.read(name))
    return Tokenizer(tmp)


@dataclass(slots=True)
class RuntimeParts:
    kv: KVCache
    tokenizer: Tokenizer | None
    channel: Channel | None  # bound listening socket of a non-first stage
    started: float
    ended: float


class RuntimeInit(threading.Thread):
    """KV cache, tokenizer (stage 0) and channel (other stages), prepared on a thread."""

    def __init__(self, plan: StagePlan, config: ModelConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(name=f"runtime-init-s{plan.spec.index}", daemon=True)
        self.plan, self.config, self.dtype, self.device = plan, config, dtype, device
        self.parts: RuntimeParts | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        started = time.time()
        try:
            spec, shape, c = self.plan.spec, self.plan.engine, self.config
            kv = KVCache(KVCacheSpec(spec.layer_start, len(spec.layers), shape.num_kv_blocks,
                                     shape.block_size, c.num_kv_heads, c.head_dim, self.dtype),
                         self.device)
            tokenizer = load_tokenizer(self.plan.uri) if spec.is_first else None
            channel = None
            if not spec.is_first:
                addrs = self.plan.addresses
                channel = Channel(addrs[spec.index], addrs[(spec.index + 1) % len(addrs)])
            self.parts = RuntimeParts(kv, tokenizer, channel, started, time.time())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the worker's main thread
            self.error = exc

    def result(self, timeout_s: float | None = None) -> RuntimeParts:
        self.join(timeout_s)
        assert not self.is_alive(), f"runtime init still running after {timeout_s} s"
        if self.error is not None:
            raise self.error
        assert self.parts is not None, "runtime init ended without parts or error"
        return self.parts


def engine_for(stage: Stage, parts: RuntimeParts, plan: StagePlan) -> LLMEngine:
    """An ``LLMEngine`` around a stage 0 that is already loaded, with the KV cache prepared
    during the fetch; with ``pp > 1`` this connects the ring and waits until every stage
    answers."""
    assert stage.spec.is_first, f"stage {stage.spec.index} cannot host the engine loop"
    shape = plan.engine
    config = EngineConfig(model=plan.uri, dtype=shape.dtype, device=str(stage.device),
                          pp=plan.pp, stage_addresses=plan.addresses or None,
                          block_size=shape.block_size, num_kv_blocks=shape.num_kv_blocks,
                          num_threads=shape.num_threads)
    runner: LocalRunner | PipelineRunner
    if plan.pp == 1:
        runner = LocalRunner(stage, parts.kv)
    else:
        runner = PipelineRunner.start(stage, parts.kv, plan.uri, list(plan.addresses),
                                      shape.dtype, str(stage.device), shape.num_threads)
    return LLMEngine.from_loaded(config, [stage.spec], parts.kv, runner, parts.tokenizer)


class PreparedStageWorker(StageWorker):
    """A non-first stage whose KV cache was allocated during the fetch; the ring's ``init``
    message only checks it has the block layout stage 0 announces."""

    def __init__(self, stage: Stage, channel: Channel, kv: KVCache) -> None:
        super().__init__(stage, channel)
        self.prepared = kv

    def _init(self, msg: Message) -> None:
        spec = self.prepared.spec
        if (spec.num_blocks, spec.block_size) != (msg.meta["num_blocks"], msg.meta["block_size"]):
            super()._init(msg)  # another layout than planned: allocate what stage 0 asks for
            return
        self.kv = self.prepared
        msg.meta.setdefault("ready", []).append(self.stage.spec.index)
        self.channel.send(msg)
