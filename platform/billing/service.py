"""Usage records: one per instance, open from allocation to release (GB x seconds of device
memory is what billing charges)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import update
from sqlalchemy.orm import Session

from hydraserve.billing.models import UsageRecord
from hydraserve.cluster.models import Instance
from hydraserve.db import utcnow
from hydraserve.functions.models import Function


def open_usage(session: Session, inst: Instance, fn: Function, device_kind: str) -> None:
    """Starts billing ``inst``'s memory share now; no commit."""
    session.add(UsageRecord(instance_id=inst.id, tenant_id=fn.tenant_id, function_id=fn.id,
                            device_kind=device_kind.split(":")[0], started_at=utcnow(),
                            memory_gb=Decimal(inst.memory_bytes) / Decimal(10**9)))


def close_usage(session: Session, instance_id: int, at: datetime) -> None:
    """Ends the open usage record of an instance at ``at``; no commit."""
    session.execute(update(UsageRecord).where(UsageRecord.instance_id == instance_id,
                                              UsageRecord.ended_at.is_(None))
                    .values(ended_at=at))
