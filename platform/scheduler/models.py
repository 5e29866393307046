"""What the planner measures about the cluster (scheduler/profiles.py writes it)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Float, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from hydraserve.db import Base, utcnow


class ModelProfile(Base):
    """A model's standalone speed on one kind of device, from the requests it served as a
    whole-model instance (pp = 1)."""

    __tablename__ = "model_profiles"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"),
                                          primary_key=True)
    device_kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    tpot_s: Mapped[float | None] = mapped_column(Float)  # decode: seconds per output token
    prefill_s: Mapped[float | None] = mapped_column(Float)  # warm: queued to first token
    prefill_s_per_token: Mapped[float | None] = mapped_column(Float)  # the same per prompt token
    samples: Mapped[int] = mapped_column(default=0)  # requests measured so far
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class PlannerMeasurement(Base):
    """One measured planner constant (``init_overhead_s``, ``hop_s``) or the profiler's
    watermark (``profiled_until``, epoch seconds of the last finished request it read)."""

    __tablename__ = "planner_measurements"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
