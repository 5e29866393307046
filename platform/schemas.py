"""Request and response schemas. The same classes validate requests and feed /openapi.json."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


def _no_nul(value: str) -> str:
    # Postgres text and jsonb cannot hold U+0000: refuse it here rather than fail on insert.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (\\u0000)")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Slo(Strict):
    ttft_ms: int = Field(ge=50, le=600_000, description="time-to-first-token objective, ms")
    tpot_ms: int = Field(ge=1, le=60_000, description="time-per-output-token objective, ms")


class SloPatch(Strict):
    ttft_ms: int | None = Field(default=None, ge=50, le=600_000)
    tpot_ms: int | None = Field(default=None, ge=1, le=60_000)


class FunctionCreate(Strict):
    """Body of ``PUT /v1/functions/<name>``; only ``model`` and ``slo`` are required."""

    model: Text = Field(min_length=1, max_length=1024,
                       description="checkpoint URI: file:///dir or http(s)://host/dir")
    slo: Slo
    keep_alive_s: int = Field(default=300, ge=0, le=86_400)
    min_instances: int = Field(default=0, ge=0, le=16)
    max_instances: int = Field(default=4, ge=1, le=64)
    description: Text = Field(default="", max_length=512)

    @model_validator(mode="after")
    def _instances_ordered(self) -> "FunctionCreate":
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) must not exceed "
                             f"max_instances ({self.max_instances})")
        return self


class FunctionPatch(Strict):
    """Body of ``PATCH``: changed fields make a new version; ``alias`` alone moves the alias."""

    model: Text | None = Field(default=None, min_length=1, max_length=1024)
    slo: SloPatch | None = None
    keep_alive_s: int | None = Field(default=None, ge=0, le=86_400)
    min_instances: int | None = Field(default=None, ge=0, le=16)
    max_instances: int | None = Field(default=None, ge=1, le=64)
    description: Text | None = Field(default=None, max_length=512)
    alias: int | None = Field(default=None, ge=1, description="point the alias at this version")

    @model_validator(mode="after")
    def _one_kind_of_change(self) -> "FunctionPatch":
        changes = self.model_dump(exclude_none=True, exclude={"alias"})
        if self.alias is not None and changes:
            raise ValueError("send either 'alias' or new settings, not both")
        if self.alias is None and not changes:
            raise ValueError("the body changes nothing; send at least one field")
        return self


class ModelOut(BaseModel):
    uri: str
    architecture: str
    dtype: str
    total_bytes: int
    num_parameters: int
    num_tensors: int
    fingerprint: str


class VersionOut(BaseModel):
    version: int
    model: ModelOut
    slo: Slo
    keep_alive_s: int
    min_instances: int
    max_instances: int
    description: str
    created_at: datetime


class FunctionOut(BaseModel):
    object: Literal["function"] = "function"
    name: str
    tenant: str
    alias_version: int
    latest_version: int
    spec: VersionOut = Field(description="the version the alias points at")
    versions: list[int]
    created_at: datetime
    updated_at: datetime


class FunctionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FunctionOut]


class Deleted(BaseModel):
    object: str
    name: str
    deleted: bool


class TenantCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN)


class TenantOut(BaseModel):
    id: int
    name: str
    created_at: datetime


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantOut]


class KeyCreate(Strict):
    name: Text = Field(default="", max_length=63)
    role: Literal["tenant", "admin"] = "tenant"


class KeyOut(BaseModel):
    id: int
    tenant: str
    prefix: str
    role: str
    name: str
    created_at: datetime
    revoked_at: datetime | None = None
    key: str | None = Field(default=None, description="the key itself; returned only at creation")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyOut]


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=100_000)


class Sampling(Strict):
    """Sampling settings shared by invocations and the OpenAI-compatible endpoints."""

    max_tokens: int = Field(default=64, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000, description="0 disables top-k")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    stop: list[Text] = Field(default_factory=list, max_length=4)
    logprobs: bool = False


class InvokeRequest(Sampling):
    """Body of ``POST /v1/functions/<name>/invocations``: exactly one of prompt, prompt_ids or
    messages."""

    prompt: Text | None = Field(default=None, max_length=100_000)
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
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
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

    model_config = ConfigDict(extra="ignore")

    model: Text = Field(min_length=1, max_length=63, description="the function's name")
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    stop: Text | list[Text] | None = None
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
    prompt: str | list[int] = Field(description="text, or token ids")


class ChatRequest(OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
