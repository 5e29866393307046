"""Models (indexed checkpoints) and functions with immutable versions and an alias."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, String, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from hydraserve.db import Base, utcnow


class Model(Base):
    """A checkpoint as indexed at registration: config plus every tensor's byte range."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("uri", "fingerprint"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    uri: Mapped[str] = mapped_column(String(1024))
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 over the per-file checksums
    architecture: Mapped[str] = mapped_column(String(64))
    dtype: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSONB)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    # [{name, dtype, shape, file, offset, length, crc32}], sorted by (file, offset)
    tensors: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    file_sizes: Mapped[dict[str, int]] = mapped_column(JSONB)
    file_sha256: Mapped[dict[str, str]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(16), default="ready")  # ready | corrupt
    status_reason: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Function(Base):
    """A named model function of one tenant; ``alias_version`` is the version invocations use."""

    __tablename__ = "functions"
    __table_args__ = (
        # Names are unique per tenant among live functions; a deleted name can be reused.
        Index("uq_functions_tenant_name_live", "tenant_id", "name", unique=True,
              postgresql_where=text("deleted_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    alias_version: Mapped[int] = mapped_column(default=1)
    latest_version: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    deleted_at: Mapped[datetime | None]

    versions: Mapped[list["FunctionVersion"]] = relationship(
        back_populates="function", order_by="FunctionVersion.version")

    def alias_spec(self) -> "FunctionVersion":
        """The version the alias points at (the versions are loaded with the function)."""
        spec = next((v for v in self.versions if v.version == self.alias_version), None)
        assert spec is not None, f"function {self.id} alias {self.alias_version} has no version row"
        return spec


class FunctionVersion(Base):
    """One immutable specification of a function: model and SLOs."""

    __tablename__ = "function_versions"
    __table_args__ = (UniqueConstraint("function_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    function_id: Mapped[int] = mapped_column(ForeignKey("functions.id", ondelete="CASCADE"))
    version: Mapped[int]
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    ttft_ms: Mapped[int]
    tpot_ms: Mapped[int]
    keep_alive_s: Mapped[int]
    min_instances: Mapped[int]
    max_instances: Mapped[int]
    max_concurrency: Mapped[int | None]  # invocations of this version queued or running
    description: Mapped[str] = mapped_column(String(512), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # set when its cold starts kept failing (scheduler/loop.py): no more starts, its queued
    # invocations fail with the reason, until a new version or an admin clears it
    unservable_reason: Mapped[str | None] = mapped_column(String(1024))
    unservable_at: Mapped[datetime | None]
    starts_cleared_at: Mapped[datetime | None]  # failed starts before this no longer count

    function: Mapped[Function] = relationship(back_populates="versions")
    model: Mapped[Model] = relationship()
