"""Usage reports: the memory-time of usage records inside a window, charged at the prices in
force, grouped by any of tenant, function and UTC day (docs/billing.md)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from hydraserve.billing.cost import Amounts, cut
from hydraserve.billing.models import UsageRecord
from hydraserve.billing.prices import price_spans
from hydraserve.billing.times import EARLIEST, LATEST, iso_utc, parse_utc
from hydraserve.db import utcnow
from hydraserve.errors import InvalidRequest, NotFound
from hydraserve.functions.models import Function
from hydraserve.tenants.models import Tenant
from hydraserve.tenants.service import Principal, get_tenant

GROUPS = ("tenant", "function", "day")
MAX_DAYS = 366


@dataclass(frozen=True, slots=True)
class ReportQuery:
    """A report's window ``[start, end)``, its grouping and, optionally, one tenant's name."""

    start: datetime
    end: datetime
    group_by: tuple[str, ...] = GROUPS
    tenant: str | None = None

    def __post_init__(self) -> None:
        for param, t in (("from", self.start), ("to", self.end)):
            if t.tzinfo is None or not EARLIEST <= t < LATEST:
                raise InvalidRequest(f"{param} {t.isoformat()} is not a UTC time within "
                                     f"{iso_utc(EARLIEST)} .. {iso_utc(LATEST)}", param)
        if self.start >= self.end:
            raise InvalidRequest(f"from {iso_utc(self.start)} is not before to "
                                 f"{iso_utc(self.end)}; give a window that ends after it starts",
                                 "from")
        if self.end - self.start > timedelta(days=MAX_DAYS):
            raise InvalidRequest(f"the window from {iso_utc(self.start)} to {iso_utc(self.end)} "
                                 f"is longer than {MAX_DAYS} days; ask for it in parts", "to")
        check_group_by(self.group_by)


def check_group_by(group_by: Sequence[str]) -> tuple[str, ...]:
    """``group_by`` if it is a non-empty subset of ``GROUPS`` (in any order), else a 400."""
    bad = [g for g in group_by if g not in GROUPS]
    if not group_by:
        why = "it is empty"
    elif bad:
        why = f"{bad[0][:30]!r} is not a grouping"
    elif len(set(group_by)) != len(group_by):
        why = "a grouping is repeated"
    else:
        return tuple(group_by)
    raise InvalidRequest(f"group_by {','.join(group_by)[:60]!r}: {why}; use a non-empty "
                         f"comma-separated subset of {','.join(GROUPS)}", "group_by")


def parse_query(start: str | None, end: str | None, group_by: str | None,
                tenant: str | None) -> ReportQuery:
    """A query from its text form (query parameters, command-line options)."""
    times = []
    for param, value in (("from", start), ("to", end)):
        if value is None:
            raise InvalidRequest(f"{param} is required, e.g. {param}=2026-01-01", param)
        try:
            times.append(parse_utc(value))
        except ValueError as exc:
            raise InvalidRequest(f"{param}: {exc}", param) from None
    groups = GROUPS if group_by is None else tuple(group_by.split(",")) if group_by else ()
    return ReportQuery(times[0], times[1], check_group_by(groups), tenant)


@dataclass(frozen=True, slots=True)
class Row:
    """One row: the values of its groups (``function`` also names when the function was
    deleted) and its amounts, each rounded once."""

    tenant: str | None
    function: str | None
    function_deleted_at: datetime | None
    day: date | None
    amounts: Amounts


@dataclass(frozen=True, slots=True)
class Report:
    query: ReportQuery
    now: datetime  # open records are charged up to here
    rows: list[Row]
    total: Amounts = field(default_factory=Amounts)  # the sums of the rounded rows


@dataclass(frozen=True, slots=True)
class _Use:
    """A usage record with the names it is reported under."""

    record: UsageRecord
    tenant: str
    function: str
    function_deleted_at: datetime | None


def usage_report(session: Session, query: ReportQuery, who: Principal | None,
                 now: datetime | None = None) -> Report:
    """The report ``query`` asks for, as ``who`` may see it: a tenant key sees its own tenant
    alone (another tenant's name is 404, as a tenant that does not exist); an admin key every
    tenant, or the one named. ``who`` None is the operator at the command line, who sees what
    an admin does. Open records are charged up to ``now`` (the clock unless given)."""
    now = now or utcnow()
    tenant_id = visible_tenant(session, who, query.tenant)
    uses = _uses(session, query, tenant_id)
    prices = price_spans(session, {u.record.device_kind for u in uses}, query.start, query.end)
    groups: dict[tuple, Amounts] = defaultdict(Amounts)
    labels: dict[tuple, _Use] = {}
    for use in uses:
        rec = use.record
        is_open = rec.ended_at is None and now < query.end
        stop = min(rec.ended_at or now, query.end)
        for piece in cut(max(rec.started_at, query.start), stop, prices[rec.device_kind]):
            key = _key(query.group_by, use, piece.day)
            groups[key].add(piece, rec.memory_gb, is_open)
            labels.setdefault(key, use)
    rows = [_row(query.group_by, key, labels[key], groups[key].rounded())
            for key in sorted(groups)]
    return Report(query, now, rows, _total(rows))


def visible_tenant(session: Session, who: Principal | None, name: str | None) -> int | None:
    """The id of the one tenant the report covers, or None for every tenant."""
    if who is not None and not who.is_admin:
        if name is not None and name != who.tenant_name:
            get_tenant(session, name)  # a bad name is a 400 like anywhere else
            raise NotFound(f"tenant {name!r} not found", "tenant")
        return who.tenant_id
    return get_tenant(session, name).id if name is not None else None


def _uses(session: Session, query: ReportQuery, tenant_id: int | None) -> list[_Use]:
    q = (select(UsageRecord, Tenant.name, Function.name, Function.deleted_at)
         .join(Tenant, Tenant.id == UsageRecord.tenant_id)
         .join(Function, Function.id == UsageRecord.function_id)  # deleted ones too
         .where(UsageRecord.started_at < query.end,
                or_(UsageRecord.ended_at.is_(None), UsageRecord.ended_at > query.start))
         .order_by(UsageRecord.id))
    if tenant_id is not None:
        q = q.where(UsageRecord.tenant_id == tenant_id)
    return [_Use(*row) for row in session.execute(q)]


def _key(group_by: tuple[str, ...], use: _Use, day: date) -> tuple:
    # sorts rows by tenant name, function name (then id: a deleted function's name may have
    # been reused) and day, in the order the groups were asked for
    parts = {"tenant": (use.tenant,), "function": (use.function, use.record.function_id),
             "day": (day,)}
    return tuple(parts[g] for g in group_by)


def _row(group_by: tuple[str, ...], key: tuple, use: _Use, amounts: Amounts) -> Row:
    values = dict(zip(group_by, key, strict=True))
    by_function = "function" in values
    return Row(tenant=use.tenant if "tenant" in values else None,
               function=use.function if by_function else None,
               function_deleted_at=use.function_deleted_at if by_function else None,
               day=values["day"][0] if "day" in values else None, amounts=amounts)


def _total(rows: list[Row]) -> Amounts:
    total = Amounts()
    for r in rows:
        total.merge(r.amounts)
    return total
