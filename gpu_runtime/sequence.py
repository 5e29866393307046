"""Per-request bookkeeping: a request is ``n`` Sequences (its choices; no beam search).

Choice 0 is queued alone; the other choices wait in its ``forks`` until its prompt has been
prefilled, then they are forked from it (sharing its prompt's KV blocks) and run as sequences of
their own. After that a choice is scheduled, preempted and recomputed like any sequence."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpu_runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from gpu_runtime.structured import TokenMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)  # identity: two requests are never the same sequence
class Sequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_len: int  # prompt + output tokens may not exceed this (context / KV capacity)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[list]] = field(default_factory=list)  # [[id, logprob], ...]
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached: int = 0  # tokens whose KV is in the cache
    num_emitted: int = 0  # output tokens already handed to the caller
    num_preemptions: int = 0
    finish_reason: str | None = None
    text: str = ""
    index: int = 0  # which choice of its request (0..n-1)
    forks: list[Sequence] = field(default_factory=list)  # choices forked after the prefill
    matcher: TokenMatcher | None = None  # response_format: the grammar state of this choice

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one choice of a request: the new tokens since the last
    output. ``finished`` is about this choice; ``request_finished`` says all are done."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    finished: bool
    finish_reason: str | None  # "stop" (EOS or stop string), "length", "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    text: str = ""  # decoded output so far, cut before a matched stop string
    new_top_logprobs: list[list[list]] = field(default_factory=list)  # per new token
    index: int = 0  # the choice
    request_finished: bool = True  # every choice of the request has finished
