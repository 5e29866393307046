"""Console billing: GB-seconds and cost per day (chart and table), the CSV of the same window,
and the price table with its add form (admins)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from flask import flash, redirect, render_template, request, url_for

from hydraserve.api.console import bp
from hydraserve.api.console.auth import require_admin, who
from hydraserve.api.context import db
from hydraserve.api.views.billing import csv_response
from hydraserve.billing import prices, report
from hydraserve.billing.schemas import price_list
from hydraserve.billing.times import parse_utc
from hydraserve.console.figures import days
from hydraserve.errors import HydraError, InvalidRequest

DEFAULT_DAYS = 30
TABLE_GROUPS = ("tenant", "function", "day")


def _window() -> tuple[str, str]:
    """The window asked for, or the last DEFAULT_DAYS days up to tomorrow's UTC midnight."""
    today = datetime.now(UTC).date()
    end = request.args.get("to") or (today + timedelta(days=1)).isoformat()
    start = request.args.get("from") or (today - timedelta(days=DEFAULT_DAYS - 1)).isoformat()
    return start, end


def _query(groups: tuple[str, ...]) -> report.ReportQuery:
    start, end = _window()
    return report.parse_query(start, end, ",".join(groups), request.args.get("tenant") or None)


@bp.get("/billing")
def billing():
    """The report of a window: one bar per UTC day, then the rows by tenant, function, day."""
    start, end = _window()
    form = {"from": start, "to": end, "tenant": request.args.get("tenant", "")}
    try:
        table = report.usage_report(db(), _query(TABLE_GROUPS), who())
        by_day = report.usage_report(db(), _query(("day",)), who(), now=table.now)
    except InvalidRequest as exc:
        return render_template("billing.html", form=form, error=exc.message), exc.status
    return render_template("billing.html", form=form, table=table, chart=day_chart(by_day),
                           csv_args={k: v for k, v in form.items() if v})


def day_chart(r: report.Report) -> dict:
    """Every day of the window, with zero for a day without usage (the chart's bars)."""
    amounts = {row.day: row.amounts for row in r.rows}
    labels, gb_s, cost = [], [], []
    for day in days(r.query.start, r.query.end):
        a = amounts.get(day)
        labels.append(day.isoformat())
        gb_s.append(float(a.gb_seconds) if a else 0.0)  # drawing only; the table is exact
        cost.append(float(a.cost_usd) if a else 0.0)
    return {"labels": labels, "gb_seconds": gb_s, "cost_usd": cost}


@bp.get("/billing/usage.csv")
def billing_csv():
    """The table's rows as CSV, as ``/v1/billing/usage?format=csv`` answers them."""
    return csv_response(report.usage_report(db(), _query(TABLE_GROUPS), who()))


@bp.route("/prices", methods=["GET", "POST"])
def price_table():
    """Prices by device kind and start (admins); POST adds one (docs/billing.md's rules)."""
    require_admin()
    form = {k: request.form.get(k, "").strip() for k in
            ("device_kind", "usd_per_gb_second", "effective_from", "effective_to")}
    if request.method == "POST":
        try:
            row = add_price(form)
        except HydraError as exc:
            return _prices_page(form, exc.message), exc.status
        flash(f"Added price {row.id}: {row.device_kind} at {form['usd_per_gb_second']} USD per "
              "GB-second.", "info")
        return redirect(url_for("console.price_table"))
    return _prices_page(form, None)


def add_price(form: dict[str, str]):
    usd: Decimal = prices.parse_usd(form["usd_per_gb_second"])
    start = _time(form["effective_from"], "effective_from")
    end = _time(form["effective_to"], "effective_to") if form["effective_to"] else None
    return prices.add_price(db(), prices.check_kind(form["device_kind"]), usd, start, end)


def _time(value: str, param: str) -> datetime:
    try:
        return parse_utc(value)
    except ValueError as exc:
        raise InvalidRequest(f"{param}: {exc}", param) from None


def _prices_page(form: dict[str, str], error: str | None) -> str:
    rows = price_list(prices.list_prices(db())).data
    return render_template("prices.html", rows=rows, form=form, error=error)
