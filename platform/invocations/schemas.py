"""Request and response schemas of invocations, native and OpenAI-compatible (they also feed
/openapi.json), and the rows-to-schema conversions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hydraserve.cluster.schemas import GroupOut
from hydraserve.errors import ErrorDetail, InvalidRequest
from hydraserve.invocations.models import Invocation, Status
from hydraserve.validation import NonEmptyText, Strict, Text

DEFAULT_MAX_TOKENS = 64  # an invocation that does not say
# OpenAI's documented defaults, for what neither the request nor the model's
# generation_config.json sets (admission.with_model_defaults)
OPENAI_SAMPLING = {"temperature": 1.0, "top_p": 1.0}
OPENAI_DEFAULT_MAX_TOKENS = 16  # an OpenAI-compatible request that does not say (OpenAI's own)
MAX_TOKENS = 4096  # the most new tokens one request may ask for
MAX_SEED = 2**31 - 1
MAX_TEXT = 100_000  # characters of a prompt or a message
MAX_CHOICES = 8  # n: the most choices one request may ask for
MAX_TOP_LOGPROBS = 20  # OpenAI's chat limit; completions allow 5
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's own limit)
Role = Literal["system", "developer", "user", "assistant"]


class ChatMessage(Strict):
    """One message of a chat. ``developer`` is OpenAI's newer name for ``system``: a chat
    template that does not know it renders it as ``system`` (``gpu_runtime.tokenizer``)."""

    role: Role
    content: Text = Field(max_length=MAX_TEXT)
    name: Text | None = Field(default=None, min_length=1, max_length=64)


class ResponseFormat(Strict):
    """OpenAI's ``response_format``; ``json_schema`` holds ``{"name", "schema", "strict"}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError(f"json_schema is required with type 'json_schema' and only then "
                             f"(type {self.type!r}, json_schema "
                             f"{'given' if self.json_schema is not None else 'missing'})")
        return self


def _check_logit_bias(bias: dict[str, float] | None) -> dict[str, float] | None:
    """Keys are token ids written as decimal strings (JSON keys are strings); the ids are
    checked against the model's vocabulary at admission."""
    if bias is None:
        return None
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise ValueError(f"key {key[:20]!r} is not a token id; keys are token ids as "
                             "decimal strings, e.g. {\"50256\": -100}")
        if not -100.0 <= value <= 100.0:
            raise ValueError(f"bias {value} of token {key} is out of range; allowed -100..100")
    return bias


class Sampling(Strict):
    """Sampling settings shared by invocations and the OpenAI-compatible endpoints."""

    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000, description="0 disables top-k")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: list[NonEmptyText] = Field(default_factory=list, max_length=4)
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS,
                              description="the most likely tokens of each step, with logprobs")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0,
                                    description="OpenAI's: subtracted once from the logit of "
                                                "every token already generated")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0,
                                     description="OpenAI's: subtracted per earlier occurrence "
                                                 "in the generated tokens")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0,
                                      description="HF/vLLM's: divides positive (multiplies "
                                                  "negative) logits of tokens of the prompt "
                                                  "and the output; 1 is off")
    logit_bias: dict[str, float] | None = Field(
        default=None, description="token id (as a string) -> bias -100..100 added to its logit")
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="choices to generate")
    response_format: ResponseFormat | None = None

    _logit_bias = field_validator("logit_bias")(_check_logit_bias)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "Sampling":
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs=true")
        return self


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
    group: GroupOut | None = Field(default=None, description="the group that served its last "
                                   "attempt and what became of that pipeline (consolidation)")


# Fields that would change the result and that we cannot honour: a 400 naming the field, never
# silently ignored. A value equivalent to leaving the field out is accepted.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "audio", "modalities",
               "prediction", "web_search_options", "suffix", "best_of")
NEUTRAL: dict[str, tuple] = {"tools": ([],), "functions": ([],), "tool_choice": ("none",),
                             "function_call": ("none",), "modalities": (["text"],),
                             "best_of": (1,)}
# Accepted and ignored: they do not change the result (docs/api.md lists them)
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class OpenAIBase(BaseModel):
    """Fields shared by the OpenAI-compatible endpoints. Unknown fields are ignored, as OpenAI
    clients send many; the ones we read are validated, and the ones in ``UNSUPPORTED`` are
    refused."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: Text = Field(min_length=1, max_length=63, description="the function's name")
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000, description="not OpenAI's; vLLM's")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: NonEmptyText | list[NonEmptyText] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0,
                                      description="not OpenAI's; vLLM's")
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None

    _logit_bias = field_validator("logit_bias")(_check_logit_bias)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: object) -> object:
        if isinstance(data, dict):
            for name in UNSUPPORTED:
                value = data.get(name)
                if value is not None and value not in NEUTRAL.get(name, ()):
                    raise InvalidRequest(f"{name} is not supported by this server; leave it "
                                         "out (it would change the result, so it is not "
                                         "ignored)", name)
        return data

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "OpenAIBase":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logprob_fields(self) -> dict:
        return {}

    def sampling(self, default_max_tokens: int) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 4:
            raise InvalidRequest(f"stop has {len(stop)} strings; at most 4 are allowed", "stop")
        # temperature, top_p and top_k only when the client set them: the model's
        # generation_config.json defaults come first, then OpenAI's (OPENAI_SAMPLING)
        chosen = {"temperature", "top_p", "top_k"} & self.model_fields_set
        fields = self.model_dump(include=chosen | {
            "seed", "n", "presence_penalty", "frequency_penalty", "repetition_penalty",
            "logit_bias", "response_format"}, exclude_none=True)
        return fields | self.logprob_fields() | {
            "max_tokens": self.max_new_tokens or default_max_tokens, "stop": stop}

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(OpenAIBase):
    prompt: Text | list[int] = Field(description="text, or token ids")
    echo: bool = Field(default=False, description="the prompt's text before the completion")
    logprobs: int | None = Field(default=None, ge=0, le=5,
                                 description="logprobs of the chosen and of this many most "
                                             "likely tokens")

    def logprob_fields(self) -> dict:
        if self.logprobs is None:
            return {}
        if self.echo:
            raise InvalidRequest("echo with logprobs is not supported: prompt tokens' logprobs "
                                 "are not computed; send one of them", "echo")
        return {"logprobs": True, "top_logprobs": self.logprobs}


class ChatMessageIn(BaseModel):
    """A chat message as OpenAI clients send it: content as a string or as a list of text
    parts (joined with newlines); tool calls and audio are refused."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Role
    content: Text | list[dict]
    name: Text | None = Field(default=None, min_length=1, max_length=64)
    tool_calls: list | None = None
    function_call: dict | None = None
    audio: dict | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: str | list[dict]) -> str:
        if isinstance(content, str):
            return content
        texts = []
        for part in content:
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"content part type {kind!r} is not supported; only 'text' "
                                 "parts ({\"type\": \"text\", \"text\": ...})")
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(text)
        return "\n".join(texts)

    @model_validator(mode="after")
    def _no_tool_calls(self) -> "ChatMessageIn":
        for name in ("tool_calls", "function_call", "audio"):
            if getattr(self, name):
                raise ValueError(f"messages with {name} are not supported; send text content")
        return self

    def native(self) -> dict:
        """The message as ``ChatMessage`` takes it."""
        return {"role": self.role, "content": self.content} | (
            {"name": self.name} if self.name is not None else {})


class ChatRequest(OpenAIBase):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprob_fields(self) -> dict:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest(f"top_logprobs={self.top_logprobs} needs logprobs=true",
                                 "top_logprobs")
        return {"logprobs": True, "top_logprobs": self.top_logprobs or 0} if self.logprobs else {}

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def invocation_out(inv: Invocation, function: str, version: int,
                   group: GroupOut | None = None) -> InvocationOut:
    return InvocationOut(group=group,
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
