"""``hydraserve billing report``: the usage report of the API, straight from the database."""

from __future__ import annotations

import click

from hydraserve.billing import report as reports
from hydraserve.billing.schemas import csv_columns, report_csv, report_out
from hydraserve.cli.admin import session
from hydraserve.errors import HydraError

NUMBERS = {"gb_seconds", "unpriced_gb_seconds", "cost_usd"}  # right-aligned


@click.group()
def billing() -> None:
    """Memory-time usage and its cost."""


@billing.command("report")
@click.option("--from", "start", required=True, help="UTC start, e.g. 2026-01-01")
@click.option("--to", "end", required=True, help="UTC end (excluded), e.g. 2026-02-01")
@click.option("--group-by", default=",".join(reports.GROUPS), show_default=True,
              help="comma-separated subset of tenant,function,day")
@click.option("--tenant", default=None, help="one tenant only")
@click.option("--csv", "as_csv", is_flag=True, help="CSV (as the API's format=csv) on stdout")
def report(start: str, end: str, group_by: str, tenant: str | None, as_csv: bool) -> None:
    """Print usage and cost of every tenant (or one) in a window, as a table or CSV."""
    with session() as s:
        try:
            query = reports.parse_query(start, end, group_by, tenant)
            result = reports.usage_report(s, query, who=None)
        except HydraError as exc:
            raise click.ClickException(exc.message) from None
    if as_csv:
        click.echo(report_csv(result), nl=False)
        return
    body = report_out(result)
    columns = csv_columns(query.group_by)
    lines = [[cell(row[c]) for c in columns] for row in body["data"]]
    total = ["total" if i == 0 else "" for i in range(len(columns) - 4)]
    lines.append([*total, *(cell(body["total"][c]) for c in columns[-4:])])
    echo_table(columns, lines)
    click.echo(f"USD; open rows are charged up to {body['now']}")


def cell(value: object) -> str:
    if isinstance(value, bool):
        return "open" if value else ""
    return "-" if value is None else str(value)


def echo_table(columns: list[str], lines: list[list[str]]) -> None:
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    for line in [columns, *lines]:
        cells = [cell.rjust(w) if col in NUMBERS else cell.ljust(w)
                 for col, cell, w in zip(columns, line, widths, strict=True)]
        click.echo("  ".join(cells).rstrip())
