"""``hydraserve admin``: bootstrap tenants and keys straight in the database."""

from __future__ import annotations

import click

from hydraserve.db import make_engine, make_session_factory
from hydraserve.errors import HydraError
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
