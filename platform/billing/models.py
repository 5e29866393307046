"""Memory-time usage records and the price table they are billed against."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import ForeignKey, Numeric, String
from sqlalchemy.orm import Mapped, mapped_column

from hydraserve.db import Base


class UsageRecord(Base):
    """GB of device memory held by one instance from allocation to release."""

    __tablename__ = "usage_records"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    function_id: Mapped[int] = mapped_column(ForeignKey("functions.id"), index=True)
    device_kind: Mapped[str] = mapped_column(String(32))
    memory_gb: Mapped[Decimal] = mapped_column(Numeric(12, 4))
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]


class Price(Base):
    """Price of one GB-second of device memory of a kind, valid from a date on."""

    __tablename__ = "prices"

    id: Mapped[int] = mapped_column(primary_key=True)
    device_kind: Mapped[str] = mapped_column(String(32), index=True)
    usd_per_gb_second: Mapped[Decimal] = mapped_column(Numeric(16, 10))
    effective_from: Mapped[datetime]
    effective_to: Mapped[datetime | None]
