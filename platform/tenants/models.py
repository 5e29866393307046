"""Tenants and their API keys (only a hash of each key is stored)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from hydraserve.db import Base, utcnow

ROLES = ("tenant", "admin")


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    # limits, checked when an invocation is accepted (tenants/limits.py); an admin sets them
    max_concurrency: Mapped[int] = mapped_column(default=64)  # invocations queued or running
    max_queued: Mapped[int] = mapped_column(default=1024, server_default="1024")
    requests_per_minute: Mapped[int] = mapped_column(default=6000, server_default="6000")
    tokens_per_minute: Mapped[int] = mapped_column(default=2_000_000, server_default="2000000")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    keys: Mapped[list["ApiKey"]] = relationship(back_populates="tenant")


class TenantUsage(Base):
    """Invocations accepted and tokens processed (prompt + output) per tenant and minute: what
    the per-minute limits count, one row a minute rather than a scan of invocations."""

    __tablename__ = "tenant_usage"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"),
                                           primary_key=True)
    minute: Mapped[datetime] = mapped_column(primary_key=True)
    requests: Mapped[int]
    tokens: Mapped[int] = mapped_column(BigInteger)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key
    prefix: Mapped[str] = mapped_column(String(12))  # shown in listings to tell keys apart
    role: Mapped[str] = mapped_column(String(16), default="tenant")
    name: Mapped[str] = mapped_column(String(63), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship(back_populates="keys")
