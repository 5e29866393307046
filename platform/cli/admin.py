"""``hydraserve admin``: bootstrap tenants and keys, and set prices, straight in the database."""

from __future__ import annotations

from datetime import datetime

import click

from hydraserve.billing import prices
from hydraserve.billing.cost import decimal_text
from hydraserve.billing.models import Price
from hydraserve.billing.times import iso_utc, parse_utc
from hydraserve.db import make_engine, make_session_factory, utcnow
from hydraserve.errors import HydraError
from hydraserve.functions import servable
from hydraserve.settings import Settings
from hydraserve.tenants import service as tenants
from hydraserve.tenants.limits import FIELDS as LIMIT_FIELDS


def session():
    return make_session_factory(make_engine(Settings.from_env().database_url))()


@click.group()
def admin() -> None:
    """Administration without the API (for bootstrapping)."""


@admin.command("create-tenant")
@click.argument("name")
@click.option("--role", type=click.Choice(["tenant", "admin"]), default="tenant", show_default=True)
@click.option("--existing-ok", is_flag=True, help="reuse the tenant if it exists")
def create_tenant(name: str, role: str, existing_ok: bool) -> None:
    """Create tenant NAME (or reuse it) and print a new API key for it."""
    with session() as s:
        try:
            tenant = tenants.create_tenant(s, name)
        except HydraError as exc:
            if not (existing_ok and exc.status == 409):
                raise click.ClickException(exc.message) from None
            tenant = tenants.get_tenant(s, name)
        _row, key = tenants.issue_key(s, tenant, "cli", role)
    click.echo(key)


@admin.command("clear-unservable")
@click.argument("tenant")
@click.argument("function")
def clear_unservable(tenant: str, function: str) -> None:
    """Clear the unservable mark of FUNCTION's alias version (its cold starts kept failing),
    after fixing the cause outside the checkpoint; its next invocation starts it again."""
    with session() as s:
        try:
            fv = servable.clear(s, tenant, function)
        except HydraError as exc:
            raise click.ClickException(exc.message) from None
    click.echo(f"{tenant}/{function} version {fv.version}: cleared")


@admin.command("set-limits")
@click.argument("name")
@click.option("--max-concurrency", type=click.IntRange(1), help="invocations queued or running")
@click.option("--max-queued", type=click.IntRange(1), help="invocations waiting to start")
@click.option("--requests-per-minute", type=click.IntRange(1))
@click.option("--tokens-per-minute", type=click.IntRange(1), help="prompt and output tokens")
def set_limits(name: str, **limits: int | None) -> None:
    """Set limits of tenant NAME (those not given keep their value) and print them all."""
    chosen = {k: v for k, v in limits.items() if v is not None}
    if not chosen:
        raise click.UsageError("give at least one limit, e.g. --max-concurrency 16")
    with session() as s:
        try:
            tenant = tenants.set_limits(s, name, chosen)
        except HydraError as exc:
            raise click.ClickException(exc.message) from None
        for field in LIMIT_FIELDS:
            click.echo(f"{field}: {getattr(tenant, field)}")


@admin.group("prices")
def prices_group() -> None:
    """The price table: USD per GB-second of device memory, per device kind."""


@prices_group.command("add")
@click.argument("device_kind")
@click.argument("usd_per_gb_second")
@click.option("--from", "effective_from", required=True,
              help="UTC start, e.g. 2026-02-01T00:00:00Z or 2026-02-01")
@click.option("--to", "effective_to", default=None, help="UTC end (default: open-ended)")
def prices_add(device_kind: str, usd_per_gb_second: str, effective_from: str,
               effective_to: str | None) -> None:
    """Add a price of DEVICE_KIND (a decimal string, e.g. 0.0000012) after the latest of
    its kind, and print the kind's prices."""
    with session() as s:
        try:
            start = utc_option("--from", effective_from)
            end = utc_option("--to", effective_to) if effective_to is not None else None
            prices.add_price(s, device_kind, prices.parse_usd(usd_per_gb_second), start, end)
        except HydraError as exc:
            raise click.ClickException(exc.message) from None
        echo_prices(prices.list_prices(s, device_kind))


@prices_group.command("list")
@click.option("--kind", "device_kind", default=None, help="one device kind only")
def prices_list(device_kind: str | None) -> None:
    """List prices by kind and start."""
    with session() as s:
        try:
            echo_prices(prices.list_prices(s, device_kind))
        except HydraError as exc:
            raise click.ClickException(exc.message) from None


@prices_group.command("delete")
@click.argument("price_id", type=click.IntRange(1))
def prices_delete(price_id: int) -> None:
    """Delete price PRICE_ID, which must not have started and must be its kind's latest."""
    with session() as s:
        try:
            row = prices.delete_price(s, price_id)
        except HydraError as exc:
            raise click.ClickException(exc.message) from None
    click.echo(f"deleted {prices.describe(row)}")


def utc_option(name: str, value: str) -> datetime:
    try:
        return parse_utc(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from None


def echo_prices(rows: list[Price]) -> None:
    now = utcnow()
    click.echo(f"{'id':>4}  {'kind':12} {'usd_per_gb_second':>18}  {'from':20}  {'to':20}  status")
    for p in rows:
        until = iso_utc(p.effective_to) if p.effective_to else "-"
        click.echo(f"{p.id:>4}  {p.device_kind:12} {decimal_text(p.usd_per_gb_second):>18}  "
                   f"{iso_utc(p.effective_from):20}  {until:20}  {prices.status(p, now)}")
