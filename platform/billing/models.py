"""Memory-time usage records and the price table they are billed against."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import CheckConstraint, ForeignKey, Index, Numeric, String, UniqueConstraint, text
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
    """Price of one GB-second of device memory of a kind over ``[effective_from,
    effective_to)``; ``effective_to`` None: until a later price closes it. The prices of a
    kind follow each other without gaps or overlaps (billing/prices.py keeps them so; the
    constraints here are the backstop)."""

    __tablename__ = "prices"
    __table_args__ = (
        UniqueConstraint("device_kind", "effective_from",
                         name="uq_prices_device_kind_effective_from"),
        # at most one open-ended price per kind: the latest
        Index("uq_prices_device_kind_open", "device_kind", unique=True,
              postgresql_where=text("effective_to IS NULL")),
        CheckConstraint("effective_to IS NULL OR effective_to > effective_from",
                        name="effective_range"),
        CheckConstraint("usd_per_gb_second >= 0", name="usd_per_gb_second_not_negative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    device_kind: Mapped[str] = mapped_column(String(32), index=True)
    usd_per_gb_second: Mapped[Decimal] = mapped_column(Numeric(16, 10))
    effective_from: Mapped[datetime]
    effective_to: Mapped[datetime | None]
