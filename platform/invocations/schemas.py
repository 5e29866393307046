"""Request and response schemas of invocations, native and OpenAI-compatible (they also feed
/openapi.json), and the rows-to-schema conversions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hydraserve.errors import ErrorDetail
from hydraserve.invocations.models import Invocation, Status
from hydraserve.validation import NonEmptyText, Strict, Text

DEFAULT_MAX_TOKENS = 64  # an invocation that does not say
OPENAI_DEFAULT_MAX_TOKENS = 16  # an OpenAI-compatible request that does not say (OpenAI's own)
MAX_TOKENS = 4096  # the most new tokens one request may ask for
MAX_SEED = 2**31 - 1
MAX_TEXT = 100_000  # characters of a prompt or a message


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=MAX_TEXT)


class Sampling(Strict):
    """Sampling settings shared by invocations and the OpenAI-compatible endpoints."""

    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000, description="0 disables top-k")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: list[NonEmptyText] = Field(default_factory=list, max_length=4)
    logprobs: bool = False


class InvokeRequest(Sampling):
    """Body of ``POST /v1/functions/<name>/invocations``: exactly one of prompt, prompt_ids or
    messages."""

    prompt: Text | None = Field(default=None, max_length=MAX_TEXT)
    prompt_ids: list[int] | None = Field(default=None, min_length=1, max_length=32_768)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one_input(self) -> "InvokeRequest":
        given = [k for k in ("prompt", "prompt_ids", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"send exactly one of prompt, prompt_ids or messages (got {given or 'none'})")
        return self


class Timings(BaseModel):
    queued_at: datetime
    planned_at: datetime | None = None
    fetched_at: datetime | None = None
    loaded_at: datetime | None = None
    first_token_at: datetime | None = None
    finished_at: datetime | None = None
    ttft_ms: float | None = Field(default=None, description="queued to first token")
    breakdown_ms: dict[str, float] = Field(
        default_factory=dict, description="queue/plan, fetch, load, prefill phases of the TTFT")


class InvocationOut(BaseModel):
    object: Literal["invocation"] = "invocation"
    id: str
    function: str
    version: int
    status: Status
    cold: bool | None
    output: dict | None
    error: ErrorDetail | None
    tokens_in: int | None
    tokens_out: int | None
    attempts: int
    instance_ids: list[int]
    timings: Timings


class OpenAIBase(BaseModel):
    """Fields shared by the OpenAI-compatible endpoints. Unknown fields are ignored, as OpenAI
    clients send many; the ones we read are validated."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: Text = Field(min_length=1, max_length=63, description="the function's name")
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: NonEmptyText | list[NonEmptyText] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="only one choice per request")

    def sampling(self, default_max_tokens: int) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 4:
            raise ValueError(f"stop has {len(stop)} strings; at most 4 are allowed")
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop": stop}


class CompletionRequest(OpenAIBase):
    prompt: Text | list[int] = Field(description="text, or token ids")


class ChatRequest(OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


def invocation_out(inv: Invocation, function: str, version: int) -> InvocationOut:
    return InvocationOut(
        id=inv.id, function=function, version=version, status=cast(Status, inv.status),
        cold=inv.cold, output=inv.output,
        error=ErrorDetail.model_validate(inv.error) if inv.error else None, tokens_in=inv.tokens_in, tokens_out=inv.tokens_out,
        attempts=inv.attempts, instance_ids=inv.instance_ids or [], timings=timings(inv))


PHASES = (("plan", "planned_at"), ("fetch", "fetched_at"), ("load", "loaded_at"),
          ("first_token", "first_token_at"))


def timings(inv: Invocation) -> Timings:
    """Phase durations of the TTFT. Each phase starts where the previous one ended, or when the
    invocation was queued if that was later (a request may join a cold start already running)."""
    breakdown: dict[str, float] = {}
    prev = inv.queued_at
    for phase, attr in PHASES:
        at = getattr(inv, attr)
        if at is None:
            continue
        breakdown[phase] = max((at - prev).total_seconds() * 1000, 0.0)
        prev = max(prev, at)
    ttft_s = inv.ttft_s()
    ttft = ttft_s * 1000 if ttft_s is not None else None
    return Timings(queued_at=inv.queued_at, planned_at=inv.planned_at, fetched_at=inv.fetched_at,
                   loaded_at=inv.loaded_at, first_token_at=inv.first_token_at,
                   finished_at=inv.finished_at, ttft_ms=ttft, breakdown_ms=breakdown)
