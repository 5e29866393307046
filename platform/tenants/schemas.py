"""Request and response schemas of tenants and API keys, and the rows-to-schema conversions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from hydraserve.tenants.models import ApiKey, Tenant
from hydraserve.validation import NAME_PATTERN, Strict, Text


class TenantCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN)


class LimitsIn(Strict):
    """Limits to set; the ones left out keep their value."""

    max_concurrency: int | None = Field(default=None, ge=1, le=1_000_000,
                                        description="invocations queued or running at once")
    max_queued: int | None = Field(default=None, ge=1, le=1_000_000,
                                   description="invocations waiting to start")
    requests_per_minute: int | None = Field(default=None, ge=1, le=100_000_000)
    tokens_per_minute: int | None = Field(default=None, ge=1, le=2_000_000_000,
                                          description="prompt and output tokens")


class TenantPatch(Strict):
    """Body of ``PATCH /v1/admin/tenants/<name>``."""

    limits: LimitsIn

    @model_validator(mode="after")
    def _changes_something(self) -> TenantPatch:
        if not self.limits.model_dump(exclude_none=True):
            raise ValueError("the body changes nothing; set at least one limit")
        return self


class LimitsOut(BaseModel):
    max_concurrency: int
    max_queued: int
    requests_per_minute: int
    tokens_per_minute: int


class TenantOut(BaseModel):
    id: int
    name: str
    limits: LimitsOut
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


def tenant_out(t: Tenant) -> TenantOut:
    limits = LimitsOut(max_concurrency=t.max_concurrency, max_queued=t.max_queued,
                       requests_per_minute=t.requests_per_minute,
                       tokens_per_minute=t.tokens_per_minute)
    return TenantOut(id=t.id, name=t.name, limits=limits, created_at=t.created_at)


def key_out(k: ApiKey, tenant: str, key: str | None = None) -> KeyOut:
    return KeyOut(id=k.id, tenant=tenant, prefix=k.prefix, role=k.role, name=k.name,
                  created_at=k.created_at, revoked_at=k.revoked_at, key=key)
