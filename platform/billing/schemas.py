"""Request and response schemas of prices and usage reports (they also feed /openapi.json),
and the conversions: rows to schemas, a report to CSV. Money and GB-seconds are decimal
strings both ways, never JSON numbers."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, WithJsonSchema

from hydraserve.billing.cost import PLACES, Amounts, decimal_text
from hydraserve.billing.models import Price
from hydraserve.billing.prices import KIND_PATTERN, USD_PATTERN, USD_RULE, parse_usd, status
from hydraserve.billing.report import Report, Row
from hydraserve.billing.times import RULE, iso_utc, parse_utc
from hydraserve.db import utcnow
from hydraserve.errors import InvalidRequest
from hydraserve.validation import Strict


def _usd(value: object) -> Decimal:
    if not isinstance(value, str):
        raise ValueError(f"must be a decimal string (a JSON number could lose digits): {USD_RULE}")
    try:
        return parse_usd(value)
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None


def _utc(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"must be a string: {RULE}")
    return parse_utc(value)


Usd = Annotated[Decimal, BeforeValidator(_usd), WithJsonSchema(
    {"type": "string", "pattern": USD_PATTERN, "examples": ["0.0000012"]})]
UtcTime = Annotated[datetime, BeforeValidator(_utc), WithJsonSchema(
    {"type": "string", "format": "date-time", "examples": ["2026-02-01T00:00:00Z"]})]
DecimalText = Annotated[str, Field(pattern=r"^-?[0-9]+(\.[0-9]+)?$",
                                   description=f"a decimal string, {PLACES} places")]


class PriceCreate(Strict):
    """Body of ``POST /v1/admin/prices``."""

    device_kind: str = Field(pattern=KIND_PATTERN, description='e.g. "cpu", "cuda"')
    usd_per_gb_second: Usd = Field(description="USD per GB of device memory per second")
    effective_from: UtcTime = Field(
        description="after the latest price of the kind; now or later when that one is open")
    effective_to: UtcTime | None = Field(
        default=None, description="none: until a later price closes it")


class PriceOut(BaseModel):
    object: Literal["price"] = "price"
    id: int
    device_kind: str
    usd_per_gb_second: str = Field(pattern=USD_PATTERN)
    effective_from: datetime
    effective_to: datetime | None
    status: Literal["scheduled", "in_force", "past"]


class PriceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PriceOut]


def price_out(p: Price, now: datetime | None = None) -> PriceOut:
    """``p``, its status at ``now`` (the clock unless given)."""
    now = now or utcnow()
    return PriceOut(id=p.id, device_kind=p.device_kind,
                    usd_per_gb_second=decimal_text(p.usd_per_gb_second),
                    effective_from=p.effective_from.astimezone(UTC),
                    effective_to=p.effective_to.astimezone(UTC) if p.effective_to else None,
                    status=status(p, now))


def price_list(rows: list[Price]) -> PriceList:
    now = utcnow()  # one clock for every row's status
    return PriceList(data=[price_out(p, now) for p in rows])


class AmountsOut(BaseModel):
    gb_seconds: DecimalText = Field(description="GB of device memory x seconds held")
    unpriced_gb_seconds: DecimalText = Field(
        description="the part of gb_seconds with no price in force (not charged)")
    cost_usd: DecimalText
    open: bool = Field(description="includes memory still held, charged up to the report's now")


class UsageRowOut(AmountsOut):
    """One row: its amounts, and the groups asked for (only those are present)."""

    tenant: str | None = None
    function: str | None = None
    function_deleted_at: datetime | None = Field(
        default=None, description="when the function was deleted; null: it is not")
    day: date | None = Field(default=None, description="UTC day")


class UsageReportOut(BaseModel):
    object: Literal["billing_report"] = "billing_report"
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    now: datetime = Field(description="open records are charged up to this time")
    group_by: list[Literal["tenant", "function", "day"]]
    currency: Literal["USD"] = "USD"
    data: list[UsageRowOut]
    total: AmountsOut = Field(description="the sums of the rows")


def _amounts(a: Amounts) -> dict:
    return {"gb_seconds": decimal_text(a.gb_seconds),
            "unpriced_gb_seconds": decimal_text(a.unpriced_gb_seconds),
            "cost_usd": decimal_text(a.cost_usd), "open": a.open}


def _groups(group_by: tuple[str, ...], row: Row) -> dict:
    out: dict = {}
    for g in group_by:
        if g == "function":
            deleted = row.function_deleted_at
            out |= {"function": row.function,
                    "function_deleted_at": deleted.astimezone(UTC) if deleted else None}
        else:
            out[g] = getattr(row, g)
    return out


def report_out(report: Report) -> dict:
    """The JSON body of a report (rows carry only the groups asked for)."""
    q = report.query
    rows = [UsageRowOut(**_groups(q.group_by, r), **_amounts(r.amounts)) for r in report.rows]
    out = UsageReportOut.model_validate({
        "from": q.start, "to": q.end, "now": report.now.astimezone(UTC),
        "group_by": list(q.group_by), "data": rows, "total": AmountsOut(**_amounts(report.total))})
    body = out.model_dump(mode="json", by_alias=True)
    body["data"] = [r.model_dump(mode="json", exclude_unset=True) for r in rows]
    return body


def csv_columns(group_by: tuple[str, ...]) -> list[str]:
    groups = [c for g in group_by
              for c in (("function", "function_deleted_at") if g == "function" else (g,))]
    return [*groups, "gb_seconds", "unpriced_gb_seconds", "cost_usd", "open"]


def report_csv(report: Report) -> str:
    """The report as CSV: a header row, then one line per row of the JSON (times ISO 8601 UTC,
    decimals as plain digits, ``open`` true/false, an empty cell for null); no total line."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(csv_columns(report.query.group_by))
    for r in report.rows:
        values = _groups(report.query.group_by, r) | _amounts(r.amounts)
        writer.writerow(_cell(v) for v in values.values())
    return buf.getvalue()


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return iso_utc(value)
    return str(value)  # names, days (ISO), decimal strings


def csv_filename(report: Report) -> str:
    q = report.query
    return (f"hydraserve-usage-{iso_utc(q.start).replace(':', '')}-"
            f"{iso_utc(q.end).replace(':', '')}.csv")

