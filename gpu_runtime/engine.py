"""The engine loop the worker drives: add requests, step, read outputs.

    engine = LLMEngine(EngineConfig(model="/models/x"))
    engine.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for out in engine.step(): ...

Requests join and leave the running batch between steps (continuous batching). The KV cache
has a fixed block budget; see ``gpu_runtime.scheduler`` for admission and preemption.

A request may ask for ``n`` choices: its prompt is prefilled once, its last row sampled ``n``
times, and the choices then decode as sequences sharing the prompt's KV blocks (copy-on-write,
``gpu_runtime.block_manager``). Choice i samples with ``choice_seed(seed, i)``, so it gives the
same tokens as a request with ``n = 1`` and that seed. ``response_format`` constrains every
choice to a JSON document (``gpu_runtime.structured``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from dataclasses import dataclass, field

import torch

from gpu_runtime.block_manager import BlockManager
from gpu_runtime.config import ModelConfig
from gpu_runtime.detokenize import before_stop
from gpu_runtime.errors import (
    DuplicateRequestError,
    PromptTooLongError,
    RuntimeInputError,
    TokenIdError,
)
from gpu_runtime.kv_cache import KVCache, KVCacheSpec, blocks_for_budget
from gpu_runtime.loader import default_device, load_stage, plan_stages, resolve_dtype
from gpu_runtime.model_runner import LocalRunner, prepare_step, sampling_of
from gpu_runtime.pipeline import PipelineRunner
from gpu_runtime.sampling import MAX_SEED, SamplingParams
from gpu_runtime.scheduler import Scheduler, SchedulerConfig
from gpu_runtime.sequence import RequestOutput, Sequence, SequenceStatus
from gpu_runtime.stage import Stage, StageSpec
from gpu_runtime.structured import Grammars, StructuredOutputError, grammar_of, step_bitmask
from gpu_runtime.tokenizer import Tokenizer

MAX_CHOICES = 8  # the most choices (``n``) one request may ask for


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed choice ``index`` of a request samples with: ``seed`` itself for choice 0 (so
    ``n = 1`` is unchanged), otherwise a hash of (seed, index) in 0..MAX_SEED."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (MAX_SEED + 1)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str
    dtype: str | None = None  # None: the checkpoint's own dtype
    device: str | None = None  # None: cuda when present, else cpu
    pp: int = 1
    stage_addresses: tuple[str, ...] | None = None  # remote stages; None: spawn them here
    block_size: int = 16
    kv_cache_bytes: int = 512 * 2**20  # per stage
    num_kv_blocks: int | None = None  # overrides kv_cache_bytes
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_threads: int | None = None  # torch intra-op threads per stage process

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= 1024:
            raise RuntimeInputError(f"block_size={self.block_size}; allowed 1..1024", "block_size")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise RuntimeInputError(f"num_kv_blocks={self.num_kv_blocks}; allowed >= 1",
                                    "num_kv_blocks")
        if self.kv_cache_bytes < 1:
            raise RuntimeInputError(f"kv_cache_bytes={self.kv_cache_bytes}; allowed >= 1",
                                    "kv_cache_bytes")
        if self.stage_addresses is not None and len(self.stage_addresses) != self.pp:
            raise RuntimeInputError(f"{len(self.stage_addresses)} stage addresses for pp="
                                    f"{self.pp}; give one per stage", "stage_addresses")


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None) -> None:
        """Loads stage 0 from ``config.model`` (and starts the other stages when pp > 1)."""
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        model_config, specs, files = plan_stages(config.model, config.pp)
        dtype = resolve_dtype(config.dtype, model_config)
        device = torch.device(config.device) if config.device else default_device()
        stage = load_stage(config.model, specs[0], model_config, files, dtype, device)
        num_blocks = config.num_kv_blocks or blocks_for_budget(
            config.kv_cache_bytes, [len(s.layers) for s in specs], config.block_size,
            model_config.num_kv_heads, model_config.head_dim, dtype)
        kv = KVCache(KVCacheSpec(0, len(specs[0].layers), num_blocks, config.block_size,
                                 model_config.num_kv_heads, model_config.head_dim, dtype), device)
        self._setup(config, specs, kv, self._runner(config, stage, kv),
                    tokenizer if tokenizer is not None else Tokenizer.maybe(config.model))

    @classmethod
    def from_loaded(cls, config: EngineConfig, specs: list[StageSpec], kv: KVCache,
                    runner: LocalRunner | PipelineRunner,
                    tokenizer: Tokenizer | None = None) -> LLMEngine:
        """An engine around a stage 0 someone else loaded (the cold-start loader): ``runner``
        already holds the stage and ``kv``; the block count comes from ``kv``."""
        engine = cls.__new__(cls)
        engine._setup(config, specs, kv, runner, tokenizer)
        return engine

    def _setup(self, config: EngineConfig, specs: list[StageSpec], kv: KVCache,
               runner: LocalRunner | PipelineRunner, tokenizer: Tokenizer | None) -> None:
        self.config = config
        self.specs = specs
        self.model_config: ModelConfig = runner.stage.config
        self.kv = kv
        self.runner = runner
        self.blocks = BlockManager(kv.spec.num_blocks, kv.spec.block_size)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.tokenizer = tokenizer
        # generation_config.json's stop ids, beside config.json's (Llama 3 Instruct lists its
        # end of turn only there); generation_config.json is read with the tokenizer
        self.generation_eos_ids = tokenizer.generation.eos_token_ids if tokenizer else ()
        self.max_len = min(self.model_config.max_position_embeddings,
                           kv.spec.num_blocks * kv.spec.block_size)
        self._requests: dict[str, list[Sequence]] = {}  # a request's choices, by index
        self._ids = itertools.count()
        self._grammars: Grammars | None = None
        self.num_prefill_tokens = 0  # prompt (and recomputed) tokens run through prefill

    @staticmethod
    def _runner(config: EngineConfig, stage: Stage, kv: KVCache) -> LocalRunner | PipelineRunner:
        if config.pp == 1:
            return LocalRunner(stage, kv)
        addresses = list(config.stage_addresses) if config.stage_addresses else None
        return PipelineRunner.start(stage, kv, config.model, addresses, config.dtype,
                                    config.device, config.num_threads)

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int],
                    params: SamplingParams | None = None, n: int = 1,
                    response_format: dict | None = None) -> None:
        """Queues a request of ``n`` choices, each constrained to ``response_format`` when
        given; raises a RuntimeInputError subclass for invalid input."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise DuplicateRequestError(f"request id {request_id!r} is already in the engine",
                                        "request_id")
        self._validate_prompt(prompt_ids)
        bad = [t for t, _ in params.logit_bias if t >= self.model_config.vocab_size]
        if bad:
            raise TokenIdError(f"logit_bias token id {bad[0]} is outside the vocabulary; "
                               f"allowed 0..{self.model_config.vocab_size - 1}", "logit_bias")
        self._validate_n(n)
        if params.stop and self.tokenizer is None:
            raise RuntimeInputError("stop strings need a tokenizer.json next to the model",
                                    "stop")
        grammar = grammar_of(response_format)
        grammars = self.grammars() if grammar is not None else None
        seqs = [Sequence(next(self._ids), request_id, list(prompt_ids),
                         dataclasses.replace(params, seed=choice_seed(params.seed, i)),
                         self.max_len, index=i,
                         matcher=grammars.matcher(grammar) if grammars and grammar else None)
                for i in range(n)]
        seqs[0].forks = seqs[1:]
        self._requests[request_id] = seqs
        self.scheduler.add(seqs[0])

    def _validate_n(self, n: int) -> None:
        limit = min(MAX_CHOICES, self.scheduler.config.max_num_seqs)
        if not (isinstance(n, int) and 1 <= n <= limit):
            raise RuntimeInputError(f"n={n!r} choices; allowed 1..{limit}", "n")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a request: config.json's, then generation_config.json's."""
        return tuple(dict.fromkeys((*self.model_config.eos_token_ids, *self.generation_eos_ids)))

    def grammars(self) -> Grammars:
        """The model's grammar compiler (``response_format``), made on first use."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise StructuredOutputError("response_format needs a tokenizer.json next to "
                                            "the model")
            self._grammars = Grammars(self.tokenizer.to_json(), self.model_config.vocab_size,
                                      self.eos_token_ids)
        return self._grammars

    def _validate_prompt(self, prompt_ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise TokenIdError("prompt is empty; give at least one token id", "prompt")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise TokenIdError(f"token id {bad[0]!r} is outside the vocabulary; allowed "
                               f"0..{vocab - 1}", "prompt")
        if len(prompt_ids) >= self.max_len:
            ctx = self.model_config.max_position_embeddings
            raise PromptTooLongError(
                f"prompt has {len(prompt_ids)} tokens; allowed at most {self.max_len - 1} "
                f"(context {ctx} tokens, KV cache {self.blocks.num_blocks * self.blocks.block_size}"
                " tokens, one left for the first output token)", "prompt")

    def abort(self, request_id: str) -> bool:
        """Drops a request (all its choices) wherever it is; True when it was unfinished."""
        seqs = self._requests.pop(request_id, [])
        unfinished = [seq for seq in seqs if not seq.is_finished]
        for seq in unfinished:
            self.scheduler.finish(seq, "abort")
        return bool(unfinished)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one prefill or decode step; returns an output per request that advanced."""
        seqs, is_prefill = self.scheduler.schedule()
        copies = self.blocks.take_copies()
        if not seqs:
            return []
        step = prepare_step(seqs, is_prefill, self.blocks)
        step.block_copies = copies
        # the sampled rows: a new request's pending forks sample from its prompt's last row
        rows = [r for seq in seqs for r in [seq, *seq.forks]]
        if len(rows) > len(seqs):
            step.num_samples = [1 + len(seq.forks) for seq in seqs]
            step.sampling = sampling_of(rows)
        step.token_bitmask = step_bitmask(rows, self.model_config.vocab_size)
        if is_prefill:
            self.num_prefill_tokens += sum(step.query_lens)
        token_ids, logprobs, top_logprobs = self.runner.execute(step)
        assert len(token_ids) == len(rows), f"{len(token_ids)} tokens for {len(rows)} rows"
        for seq in seqs:
            seq.num_cached = seq.num_tokens
            if seq.forks:
                self.scheduler.fork(seq)
        return [self._advance(*row) for row in zip(rows, token_ids, logprobs, top_logprobs,
                                                   strict=True)]

    def _advance(self, seq: Sequence, token: int, logprob: float, top: list) -> RequestOutput:
        seq.output_ids.append(token)
        seq.output_logprobs.append(logprob)
        seq.output_top_logprobs.append(top)
        reason = self._finish_reason(seq, token)
        if reason:
            self.scheduler.finish(seq, reason)
        choices = self._requests.get(seq.request_id, [])
        done = all(s.is_finished for s in choices)
        if done:
            self._requests.pop(seq.request_id, None)
        return self._output(seq, done)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and (token in self.model_config.eos_token_ids
                                 or token in self.generation_eos_ids):
            return "stop"
        # the grammar refused a token (only a matcher error can let one through) or the
        # document is complete: either way nothing valid may follow
        if seq.matcher is not None and (not seq.matcher.accept(token) or seq.matcher.is_stopped):
            return "stop"
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_ids)
            seq.text = before_stop(text, p.stop)
            if seq.text != text:
                return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= seq.max_len:
            return "length"
        return None

    def _output(self, seq: Sequence, request_finished: bool) -> RequestOutput:
        start, seq.num_emitted = seq.num_emitted, len(seq.output_ids)
        return RequestOutput(seq.request_id, seq.output_ids[start:], seq.output_logprobs[start:],
                             seq.is_finished, seq.finish_reason, len(seq.prompt_ids),
                             len(seq.output_ids), seq.text,
                             new_top_logprobs=seq.output_top_logprobs[start:], index=seq.index,
                             request_finished=request_finished)

    # ---- KV export / import (for migration between processes; the platform does not migrate yet)

    def export_kv(self, request_id: str, layers: range | None = None) -> torch.Tensor:
        """A running sequence's KV for ``layers`` held by this process, as one tensor
        (len(layers), 2, num_cached_tokens, kv_heads, head_dim)."""
        seq = self._running(request_id)
        layers = layers if layers is not None else self.specs[0].layers
        return self.kv.export_kv(self.blocks.block_table(seq.seq_id), seq.num_cached, layers)

    def import_kv(self, request_id: str, kv: torch.Tensor, layers: range | None = None) -> None:
        """Writes KV exported elsewhere into this process's cache for a running sequence."""
        seq = self._running(request_id)
        layers = layers if layers is not None else self.specs[0].layers
        assert kv.shape[2] == seq.num_cached, (
            f"KV holds {kv.shape[2]} tokens, sequence {request_id!r} has {seq.num_cached}")
        self.kv.import_kv(self.blocks.block_table(seq.seq_id), kv, layers)

    def _running(self, request_id: str) -> Sequence:
        """Choice 0 of a running request (KV export and import move one sequence)."""
        seq = self._requests.get(request_id, [None])[0]
        if seq is None or seq.status is not SequenceStatus.RUNNING:
            raise RuntimeInputError(f"request {request_id!r} is not running", "request_id")
        return seq

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
