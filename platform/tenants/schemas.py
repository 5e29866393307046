"""Request and response schemas of tenants and API keys, and the rows-to-schema conversions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from hydraserve.tenants.models import ApiKey, Tenant
from hydraserve.validation import NAME_PATTERN, Strict, Text


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


def tenant_out(t: Tenant) -> TenantOut:
    return TenantOut(id=t.id, name=t.name, created_at=t.created_at)


def key_out(k: ApiKey, tenant: str, key: str | None = None) -> KeyOut:
    return KeyOut(id=k.id, tenant=tenant, prefix=k.prefix, role=k.role, name=k.name,
                  created_at=k.created_at, revoked_at=k.revoked_at, key=key)
