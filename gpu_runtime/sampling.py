"""Sampling parameters (validated) and the batched sampler run on the last stage.

What the sampler does to a row's logits, in order (vLLM's order): add ``logit_bias``, apply the
penalties (HF/vLLM ``repetition_penalty`` over prompt and output tokens, OpenAI
``presence_penalty``/``frequency_penalty`` over output tokens), then temperature, top-k, top-p and
the draw. Log-probabilities, of the chosen token and the top ones, come from the log-softmax of
the model's raw logits, before all of that (vLLM's default, ``raw_logprobs``): they describe the
model, not the request's sampling settings.

Seeded sampling is stateless: the draw for a sequence's n-th output token uses a generator seeded
from ``(seed, n)``, so it does not depend on batch composition, on which process samples, or on
whether the sequence was preempted and recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch

from gpu_runtime import backends
from gpu_runtime.devices import to_device
from gpu_runtime.errors import SamplingParamsError

MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20
MAX_BIAS = 100.0


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
    top_logprobs: int = 0  # this many most likely tokens of each step, with their logprobs
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token in the output
    frequency_penalty: float = 0.0  # OpenAI: minus this per occurrence in the output
    repetition_penalty: float = 1.0  # HF/vLLM: over prompt and output tokens; 1 is off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

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
        _check(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs", self.top_logprobs,
               f"0..{MAX_TOP_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            _check(-2.0 <= getattr(self, name) <= 2.0, name, getattr(self, name), "-2.0..2.0")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty,
               "> 0 (1.0 = off)")
        _check(all(isinstance(t, int) and t >= 0 and -MAX_BIAS <= b <= MAX_BIAS
                   for t, b in self.logit_bias), "logit_bias", self.logit_bias,
               f"(token id >= 0, bias -{MAX_BIAS:g}..{MAX_BIAS:g}) pairs")

    @property
    def needs_history(self) -> bool:
        """True when sampling reads the sequence's earlier tokens (a penalty is on)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise SamplingParamsError(f"{name}={value!r} is out of range; allowed {allowed}", name)


def _rows(n: int, value: object) -> list:
    return [value] * n


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling settings of one step, in the plain form the channel carries (JSON
    lists, ``to_meta``). Token histories travel only for rows with a penalty on."""

    temperatures: list[float]
    top_ps: list[float]
    top_ks: list[int]
    seeds: list[int]  # -1: unseeded
    steps: list[int]  # output tokens the sequence already has
    top_logprobs: list[int] = field(default_factory=list)  # empty: 0 for every row
    presence_penalties: list[float] = field(default_factory=list)  # empty: no penalties
    frequency_penalties: list[float] = field(default_factory=list)
    repetition_penalties: list[float] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)  # [] for a row without penalty
    output_ids: list[list[int]] = field(default_factory=list)
    logit_biases: list[list[list]] = field(default_factory=list)  # [[token id, bias], ...]

    @classmethod
    def of(cls, params: list[SamplingParams], steps: list[int],
           histories: list[tuple[list[int], list[int]]] | None = None) -> SamplingBatch:
        """``histories``: each row's (prompt ids, output ids), read for rows with a penalty."""
        batch = cls([p.temperature for p in params], [p.top_p for p in params],
                    [p.top_k for p in params],
                    [-1 if p.seed is None else p.seed for p in params], steps)
        if any(p.top_logprobs for p in params):
            batch.top_logprobs = [p.top_logprobs for p in params]
        if any(p.logit_bias for p in params):
            batch.logit_biases = [[[t, b] for t, b in p.logit_bias] for p in params]
        if any(p.needs_history for p in params):
            assert histories is not None and len(histories) == len(params), (
                f"penalties need each row's tokens; got {histories and len(histories)} "
                f"histories for {len(params)} rows")
            batch.presence_penalties = [p.presence_penalty for p in params]
            batch.frequency_penalties = [p.frequency_penalty for p in params]
            batch.repetition_penalties = [p.repetition_penalty for p in params]
            batch.prompt_ids = [list(h[0]) if p.needs_history else []
                                for p, h in zip(params, histories, strict=True)]
            batch.output_ids = [list(h[1]) if p.needs_history else []
                                for p, h in zip(params, histories, strict=True)]
        return batch

    def to_meta(self) -> dict:
        """The batch as JSON-able lists, for the stage channel."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_meta(cls, meta: dict) -> SamplingBatch:
        return cls(**meta)

    @property
    def all_greedy(self) -> bool:
        return all(t == 0.0 for t in self.temperatures)

    @property
    def max_top_logprobs(self) -> int:
        return max(self.top_logprobs, default=0)


class Sampled(NamedTuple):
    """One step's draw: per row the token, its logprob and the top logprobs asked for (a list
    of ``[token id, logprob]``, most likely first; empty when none were asked)."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[list]]


def sample(logits: torch.Tensor, batch: SamplingBatch) -> Sampled:
    """logits: float32 (rows, vocab) -> tokens drawn from the processed logits (bias,
    penalties, temperature, top-k/p), with log-softmax of the raw logits at them and at each
    row's top tokens. A log-probability is the logit minus its row's log-sum-exp; the backend
    finds that and the argmax (the native kernel: in one pass, without writing a log-softmax of
    the whole vocabulary)."""
    processed = apply_penalties(logits, batch)
    argmax, lse = backends.for_device(logits.device).logits_stats(logits)
    top = _top_logprobs(logits, batch)
    if processed is not logits:
        argmax = processed.argmax(dim=-1)
    tokens = argmax if batch.all_greedy else _sample_random(processed, batch)
    chosen = logits.gather(1, tokens[:, None])[:, 0] - lse
    return Sampled(tokens.tolist(), chosen.tolist(), top)


def _top_logprobs(logits: torch.Tensor, batch: SamplingBatch) -> list[list[list]]:
    k = batch.max_top_logprobs
    rows = logits.shape[0]
    if k == 0:
        return [[] for _ in range(rows)]
    values, ids = torch.log_softmax(logits, dim=-1).topk(min(k, logits.shape[1]), dim=-1)
    values_l, ids_l = values.tolist(), ids.tolist()  # (rows, k), most likely first
    return [[[t, v] for t, v in zip(ids_l[r][:n], values_l[r][:n], strict=True)]
            for r, n in enumerate(batch.top_logprobs)]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """``logits`` with each row's logit_bias added and its penalties applied (a new tensor;
    ``logits`` itself when no row has any). Repetition (HF ``RepetitionPenaltyLogitsProcessor``,
    vLLM): a logit of a token seen in the prompt or output is divided by the penalty when
    positive, multiplied when negative. Frequency and presence (OpenAI): minus
    ``frequency * count + presence * (count > 0)``, counts over the output tokens."""
    if not batch.logit_biases and not batch.prompt_ids:
        return logits
    out = logits.clone()
    vocab = logits.shape[1]
    for row in range(logits.shape[0]):
        if batch.logit_biases and batch.logit_biases[row]:
            ids, bias = zip(*batch.logit_biases[row], strict=True)
            out[row, list(ids)] += torch.tensor(bias, dtype=out.dtype, device=out.device)
        if batch.prompt_ids:
            _penalise(out[row], batch, row, vocab)
    return out


def _penalise(row_logits: torch.Tensor, batch: SamplingBatch, row: int, vocab: int) -> None:
    rep = batch.repetition_penalties[row]
    device = row_logits.device
    if rep != 1.0:
        seen = torch.tensor(sorted(set(batch.prompt_ids[row]) | set(batch.output_ids[row])),
                            dtype=torch.long, device=device)
        picked = row_logits[seen]
        row_logits[seen] = torch.where(picked > 0, picked / rep, picked * rep)
    freq, pres = batch.frequency_penalties[row], batch.presence_penalties[row]
    if (freq or pres) and batch.output_ids[row]:
        counts = torch.bincount(torch.tensor(batch.output_ids[row], device=device),
                                minlength=vocab)[:vocab].to(row_logits.dtype)  # (vocab,)
        row_logits -= freq * counts + pres * (counts > 0).to(row_logits.dtype)


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    rows = logits.shape[0]
    temps = to_device(torch.tensor(batch.temperatures, dtype=torch.float32), logits.device)
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
    ks = to_device(torch.tensor([k if k > 0 else vocab for k in batch.top_ks]), logits.device)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    drop = rank >= ks[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    ps = to_device(torch.tensor(batch.top_ps), logits.device)
    # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
    drop |= (probs.cumsum(dim=-1) - probs) >= ps[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
