"""Cluster state: nodes, their devices, cold-start plans and the instances they start."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Float, ForeignKey, String, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from hydraserve.db import Base, utcnow

# An instance goes starting -> ready -> stopping -> released, or to failed from any state.
LIVE = ("starting", "ready", "stopping")  # holds device memory (and is billed)
CLOSED = ("released", "failed")  # ended for good
CONSOLIDATION = ("consolidating", "consolidated", "skipped", "failed")
# Requests stage 0 of a group runs at once (its broker prefetch); the scheduler adds a group
# when more than this many per group wait.
MAX_BATCH = 16
ERROR_CHARS = 1000  # what an instance row keeps of an error (the column holds 1024)


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)  # also names queue node.<id>
    address: Mapped[str] = mapped_column(String(255), default="")
    link_mbps: Mapped[float | None] = mapped_column(Float)  # emulated link cap, None = uncapped
    status: Mapped[str] = mapped_column(String(16), default="up")  # up | down | draining
    last_heartbeat_at: Mapped[datetime | None]
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    info: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)


class Device(Base):
    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("node_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    index: Mapped[int]
    kind: Mapped[str] = mapped_column(String(32))  # cpu | cuda:<model name>
    memory_bytes: Mapped[int] = mapped_column(BigInteger)


class Plan(Base):
    """A cold-start decision: pipeline size, per-stage placement and memory share."""

    __tablename__ = "plans"

    id: Mapped[int] = mapped_column(primary_key=True)
    function_version_id: Mapped[int] = mapped_column(ForeignKey("function_versions.id"), index=True)
    pp: Mapped[int]
    # [{stage, node_id, device_id, memory_bytes, full_share, byte_ranges}]
    stages: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    predicted_ttft_ms: Mapped[float | None] = mapped_column(Float)
    predicted_tpot_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    reason: Mapped[str] = mapped_column(String(512), default="")
    # the scheduler policy it was made under (scheduler/policies.py)
    policy: Mapped[str] = mapped_column(String(16), default="hydra", server_default="hydra")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # consolidation (docs/consolidation.md): None until decided, then one of CONSOLIDATION
    consolidation_state: Mapped[str | None] = mapped_column(String(16))
    consolidation_target: Mapped[int | None]  # the pipeline size it turns into
    consolidation_reason: Mapped[str | None] = mapped_column(String(512))
    consolidation_started_at: Mapped[datetime | None]
    consolidated_at: Mapped[datetime | None]
    # what the switch did: blocks and bytes migrated, the pause, the fetch of the rest
    consolidation: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict,
                                                          server_default="{}")


class Instance(Base):
    """One worker holding a stage (or the whole model) of a function version on a device."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    function_version_id: Mapped[int] = mapped_column(ForeignKey("function_versions.id"), index=True)
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("plans.id"))
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"))
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id"))
    stage_index: Mapped[int] = mapped_column(default=0)
    num_stages: Mapped[int] = mapped_column(default=1)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    # one of LIVE or CLOSED
    status: Mapped[str] = mapped_column(String(16), default="starting", index=True)
    address: Mapped[str] = mapped_column(String(255), default="")  # activation channel endpoint
    pid: Mapped[int | None]
    timeline: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    error: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    ready_at: Mapped[datetime | None]
    last_active_at: Mapped[datetime | None]
    released_at: Mapped[datetime | None]


# ---- what the planner measures (scheduler/profiles.py writes it) ----------------------------

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
