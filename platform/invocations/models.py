"""Invocations: every accepted request ends here with a result or a recorded error."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import ForeignKey, Index, String, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from hydraserve.db import Base, NulSafeJSONB, utcnow

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[Status, ...] = get_args(Status)
FINISHED = ("succeeded", "failed", "cancelled")  # an invocation in one of these never changes


class Invocation(Base):
    __tablename__ = "invocations"
    __table_args__ = (
        # admission counts a tenant's unfinished invocations (tenants/limits.py)
        Index("ix_invocations_tenant_unfinished", "tenant_id", "status",
              postgresql_where=text("status IN ('queued', 'running')")),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    function_id: Mapped[int] = mapped_column(ForeignKey("functions.id"), index=True)
    function_version_id: Mapped[int] = mapped_column(ForeignKey("function_versions.id"))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSONB)
    output: Mapped[dict[str, Any] | None] = mapped_column(NulSafeJSONB)  # NUL is kept
    error: Mapped[dict[str, Any] | None] = mapped_column(NulSafeJSONB)
    cold: Mapped[bool | None]
    attempts: Mapped[int] = mapped_column(default=0)
    # deaths of a worker while it was prefilling this request (invocations/quarantine.py)
    worker_deaths: Mapped[int] = mapped_column(default=0, server_default="0")
    tokens_in: Mapped[int | None]
    tokens_out: Mapped[int | None]
    instance_ids: Mapped[list[int]] = mapped_column(JSONB, default=list)
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    planned_at: Mapped[datetime | None]
    fetched_at: Mapped[datetime | None]
    loaded_at: Mapped[datetime | None]
    first_token_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    def ttft_s(self) -> float | None:
        """Seconds from acceptance to the first token; None before there is one."""
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.queued_at).total_seconds()

    def tpot_s(self) -> float | None:
        """Mean seconds per output token after the first; None until it has finished with
        two tokens or more."""
        out = self.tokens_out or 0
        if self.first_token_at is None or self.finished_at is None or out < 2:
            return None
        return (self.finished_at - self.first_token_at).total_seconds() / (out - 1)
