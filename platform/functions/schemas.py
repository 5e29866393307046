"""Request and response schemas of the function registry (they also feed /openapi.json),
and the rows-to-schema conversions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from hydraserve.functions.models import Function, FunctionVersion, Model
from hydraserve.validation import Strict, Text


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
    max_concurrency: int | None = Field(
        default=None, ge=1, le=100_000,
        description="invocations of this function queued or running at once; none: the "
                    "tenant's limit alone")
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
    max_concurrency: int | None = Field(default=None, ge=1, le=100_000)
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


class Unservable(BaseModel):
    reason: str
    since: datetime


class VersionOut(BaseModel):
    version: int
    model: ModelOut
    slo: Slo
    keep_alive_s: int
    min_instances: int
    max_instances: int
    max_concurrency: int | None
    description: str
    created_at: datetime
    unservable: Unservable | None = Field(
        default=None, description="set when this version's cold starts kept failing: why, and "
        "since when; a new version or an admin clears it")


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


def model_out(m: Model) -> ModelOut:
    return ModelOut(uri=m.uri, architecture=m.architecture, dtype=m.dtype,
                    total_bytes=m.total_bytes, num_parameters=m.num_parameters,
                    num_tensors=len(m.tensors), fingerprint=m.fingerprint)


def version_out(v: FunctionVersion) -> VersionOut:
    return VersionOut(version=v.version, model=model_out(v.model),
                      slo=Slo(ttft_ms=v.ttft_ms, tpot_ms=v.tpot_ms), keep_alive_s=v.keep_alive_s,
                      min_instances=v.min_instances, max_instances=v.max_instances,
                      max_concurrency=v.max_concurrency,
                      description=v.description, created_at=v.created_at,
                      unservable=Unservable(reason=v.unservable_reason, since=v.unservable_at)
                      if v.unservable_reason and v.unservable_at else None)


def function_out(fn: Function, tenant: str) -> FunctionOut:
    return FunctionOut(name=fn.name, tenant=tenant, alias_version=fn.alias_version,
                       latest_version=fn.latest_version, spec=version_out(fn.alias_spec()),
                       versions=[v.version for v in fn.versions], created_at=fn.created_at,
                       updated_at=fn.updated_at)
