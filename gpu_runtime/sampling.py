"""Sampling parameters (validated) and the batched sampler run on the last stage.

Seeded sampling is stateless: the draw for a sequence's n-th output token uses a generator seeded
from ``(seed, n)``, so it does not depend on batch composition, on which process samples, or on
whether the sequence was preempted and recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_runtime import kernels
from gpu_runtime.errors import SamplingParamsError

MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 means off; top_p 1.0 means off."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, ">= 1")
        _check(0.0 <= self.temperature <= MAX_TEMPERATURE, "temperature", self.temperature,
               f"0.0..{MAX_TEMPERATURE} (0 = greedy)")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "(0.0, 1.0]")
        _check(self.top_k >= 0, "top_k", self.top_k, ">= 0 (0 = off)")
        _check(self.seed is None or 0 <= self.seed <= MAX_SEED, "seed", self.seed,
               f"0..{MAX_SEED} or None")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "non-empty strings")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise SamplingParamsError(f"{name}={value!r} is out of range; allowed {allowed}", name)


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling settings of one step, in the plain form the channel carries."""

    temperatures: list[float]
    top_ps: list[float]
    top_ks: list[int]
    seeds: list[int]  # -1: unseeded
    steps: list[int]  # output tokens the sequence already has

    @classmethod
    def of(cls, params: list[SamplingParams], steps: list[int]) -> SamplingBatch:
        return cls([p.temperature for p in params], [p.top_p for p in params],
                   [p.top_k for p in params],
                   [-1 if p.seed is None else p.seed for p in params], steps)

    @property
    def all_greedy(self) -> bool:
        return all(t == 0.0 for t in self.temperatures)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[list[int], list[float]]:
    """logits: float32 (rows, vocab) -> (token ids, log-softmax of the raw logits at them).
    A log-probability is the logit minus its row's log-sum-exp; the native kernel finds that
    and the argmax in one pass, without writing a log-softmax of the whole vocabulary."""
    stats = kernels.logits_stats(logits)
    if stats is None:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1) if batch.all_greedy else _sample_random(logits, batch)
        return tokens.tolist(), logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    argmax, lse = stats
    tokens = argmax if batch.all_greedy else _sample_random(logits, batch)
    chosen = logits.gather(1, tokens[:, None])[:, 0] - lse
    return tokens.tolist(), chosen.tolist()


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    rows = logits.shape[0]
    temps = torch.tensor(batch.temperatures, dtype=torch.float32, device=logits.device)
    greedy = temps == 0.0
    scaled = logits / torch.where(greedy, 1.0, temps)[:, None]
    if any(k > 0 for k in batch.top_ks) or any(p < 1.0 for p in batch.top_ps):
        scaled = _top_k_top_p(scaled, batch)
    probs = torch.softmax(scaled, dim=-1)
    # exponential race: argmax(p / E) with E ~ Exp(1) draws a token with probability p
    noise = torch.empty_like(probs)
    for row in range(rows):
        gen = None
        if batch.seeds[row] >= 0:
            gen = torch.Generator(device=logits.device)
            gen.manual_seed((batch.seeds[row] * 1_000_003 + batch.steps[row]) % (2**63))
        noise[row].exponential_(generator=gen)
    tokens = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), tokens)


def _top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (rows, vocab)
    ks = torch.tensor([k if k > 0 else vocab for k in batch.top_ks], device=logits.device)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    drop = rank >= ks[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    ps = torch.tensor(batch.top_ps, device=logits.device)
    # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
    drop |= (probs.cumsum(dim=-1) - probs) >= ps[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
