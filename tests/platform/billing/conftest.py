"""Billing fixtures: a node with a cpu and a cuda device, functions registered over the API,
usage records written with chosen times, and prices added through the service with a chosen
clock, all inside the test's rolled-back transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import pytest
from sqlalchemy import select

from hydraserve.billing import prices
from hydraserve.billing.models import UsageRecord
from hydraserve.billing.report import Report, parse_query, usage_report
from hydraserve.billing.times import parse_utc
from hydraserve.cluster import service as cluster
from hydraserve.cluster.models import Device, Instance
from hydraserve.cluster.service import DeviceSpec
from hydraserve.functions.models import Function, FunctionVersion

NODE = "bill-node"
EARLY = parse_utc("2025-01-01T00:00:00Z")  # the clock prices are added at: every date is ahead
GB = 10**9


def at(text: str) -> datetime:
    return parse_utc(text)


@dataclass
class Billing:
    """Writes what a report reads, with the times a test chooses."""

    s: object
    client: object
    register: object

    def function(self, headers: dict, name: str) -> FunctionVersion:
        resp = self.register(headers, name)
        assert resp.status_code == 201, resp.json
        fn = self.s.scalars(select(Function).where(Function.name == name)  # the one just made
                            .order_by(Function.id.desc()).limit(1)).one()
        return self.s.scalars(select(FunctionVersion).where(
            FunctionVersion.function_id == fn.id)).one()

    def device(self, kind: str) -> Device:
        return self.s.scalars(select(Device).where(Device.node_id == NODE,
                                                   Device.kind.startswith(kind))).one()

    def record(self, fv: FunctionVersion, kind: str, gb: str, start: str,
               end: str | None) -> UsageRecord:
        """One instance holding ``gb`` GB of a ``kind`` device over [start, end)."""
        device = self.device(kind)
        fn = self.s.get(Function, fv.function_id)
        inst = Instance(function_version_id=fv.id, node_id=NODE, device_id=device.id,
                        memory_bytes=int(Decimal(gb) * GB),
                        status="ready" if end is None else "released")
        self.s.add(inst)
        self.s.flush()
        rec = UsageRecord(instance_id=inst.id, tenant_id=fn.tenant_id, function_id=fn.id,
                          device_kind=kind, memory_gb=Decimal(gb), started_at=at(start),
                          ended_at=at(end) if end else None)
        self.s.add(rec)
        self.s.commit()
        return rec

    def price(self, kind: str, usd: str, start: str, end: str | None = None):
        return prices.add_price(self.s, kind, Decimal(usd), at(start),
                                at(end) if end else None, now=EARLY)

    def report(self, start: str, end: str, group_by: str = "tenant,function,day",
               now: str = "2027-01-01T00:00:00Z", tenant: str | None = None) -> Report:
        query = parse_query(start, end, group_by, tenant)
        return usage_report(self.s, query, None, now=at(now))


@pytest.fixture
def bill(db_session, client, register) -> Billing:
    cluster.register(db_session, NODE, "10.9.9.9", None,
                     [DeviceSpec(0, "cpu", 64 * GB), DeviceSpec(1, "cuda:H200", 141 * GB),
                      DeviceSpec(2, "tpu", 16 * GB)], {})
    return Billing(db_session, client, register)


def figures(report: Report) -> list[tuple]:
    """Each row as (its groups..., gb_seconds, unpriced_gb_seconds, cost_usd, open), strings."""
    out = []
    for r in report.rows:
        groups = [v for g, v in (("tenant", r.tenant), ("function", r.function),
                                 ("day", r.day and r.day.isoformat()))
                  if g in report.query.group_by]
        a = r.amounts
        out.append((*groups, str(a.gb_seconds), str(a.unpriced_gb_seconds), str(a.cost_usd),
                    a.open))
    return out
