"""``/v1/admin/prices`` (admin keys) and ``/v1/billing/usage`` (any key: a tenant sees its own
usage, an admin every tenant's)."""

from __future__ import annotations

from flask import Blueprint, Response, g, request

from hydraserve.api.context import db
from hydraserve.api.openapi import operation
from hydraserve.billing import prices, report
from hydraserve.billing.schemas import (
    PriceCreate,
    PriceList,
    PriceOut,
    UsageReportOut,
    csv_filename,
    price_list,
    price_out,
    report_csv,
    report_out,
)
from hydraserve.errors import InvalidRequest
from hydraserve.validation import NAME_PARAM

bp = Blueprint("billing", __name__)
KIND = {"device_kind": {"type": "string", "pattern": prices.KIND_PATTERN}}
TIME = {"type": "string", "format": "date-time", "description": "UTC, e.g. 2026-01-01T00:00:00Z"}
GROUP_BY = r"^(tenant|function|day)(,(tenant|function|day)){0,2}$"
USAGE: dict[str, dict] = {
    "from": TIME | {"description": "start of the window (required), UTC"},
    "to": TIME | {"description": f"end of the window (required), at most {report.MAX_DAYS} "
                                 "days after from"},
    "group_by": {"type": "string", "pattern": GROUP_BY, "default": "tenant,function,day"},
    "tenant": NAME_PARAM | {"description": "one tenant (a tenant key: its own only)"},
    "format": {"type": "string", "enum": ["json", "csv"], "default": "json"},
}
FORMATS = ("json", "csv")


@operation(bp, "/v1/admin/prices", "GET", summary="List prices", auth="admin",
           response=PriceList, query_params=KIND)
def list_prices():
    return price_list(prices.list_prices(db(), request.args.get("device_kind"))).model_dump(
        mode="json")


@operation(bp, "/v1/admin/prices", "POST", summary="Add a price from a date on", auth="admin",
           body=PriceCreate, response=PriceOut, status=201)
def add_price(body: PriceCreate):
    row = prices.add_price(db(), body.device_kind, body.usd_per_gb_second, body.effective_from,
                           body.effective_to)
    return price_out(row).model_dump(mode="json"), 201


@operation(bp, "/v1/admin/prices/<int:price_id>", "DELETE",
           summary="Delete a price that has not started", auth="admin", response=PriceOut,
           path_params={"price_id": {"type": "integer", "minimum": 1,
                                     "maximum": prices.MAX_ID}})
def delete_price(price_id: int):
    return price_out(prices.delete_price(db(), price_id)).model_dump(mode="json")


@operation(bp, "/v1/billing/usage", "GET",
           summary="Usage and cost by tenant, function and day (format=csv: text/csv)",
           response=UsageReportOut, query_params=USAGE)
def usage():
    """The memory-time report of a window (docs/billing.md), as JSON or as CSV."""
    args = request.args
    fmt = args.get("format", "json")
    if fmt not in FORMATS:
        raise InvalidRequest(f"format {fmt[:30]!r} is not one of {', '.join(FORMATS)}", "format")
    query = report.parse_query(args.get("from"), args.get("to"), args.get("group_by"),
                               args.get("tenant"))
    result = report.usage_report(db(), query, g.principal)
    if fmt == "json":
        return report_out(result)
    return csv_response(result)


def csv_response(result: report.Report) -> Response:
    """A report as a CSV download (the API's format=csv and the console's link)."""
    return Response(report_csv(result), mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="{csv_filename(result)}"'})
