"""Usage records: one per instance, open from allocation to release (GB x seconds of device
memory is what billing charges)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from hydraserve.billing.models import UsageRecord
from hydraserve.cluster.models import Instance
from hydraserve.db import utcnow
from hydraserve.functions.models import Function
from hydraserve.tenants.models import Tenant


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


def gb_seconds_by_tenant(session: Session) -> dict[str, float]:
    """GB of device memory x seconds held, per tenant name, over every usage record (open ones
    up to now): the figure /metrics exports (the bill itself is billing/report.py)."""
    held = func.extract("epoch", func.coalesce(UsageRecord.ended_at, func.now())
                        - UsageRecord.started_at)
    rows = session.execute(select(Tenant.name, func.sum(UsageRecord.memory_gb * held))
                           .join(Tenant, Tenant.id == UsageRecord.tenant_id)
                           .group_by(Tenant.name))
    return {name: float(total or 0) for name, total in rows}
