"""Per-request bookkeeping: one Sequence per request (no beam search / n > 1)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gpu_runtime.sampling import SamplingParams


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
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached: int = 0  # tokens whose KV is in the cache
    num_emitted: int = 0  # output tokens already handed to the caller
    num_preemptions: int = 0
    finish_reason: str | None = None
    text: str = ""

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
    """What one step produced for one request: the new tokens since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    finished: bool
    finish_reason: str | None  # "stop" (EOS or stop string), "length", "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    text: str = ""  # decoded output so far, cut before a matched stop string
