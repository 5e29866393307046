"""``hydraserve cluster up|down``: the local cluster of ``make up``."""

from __future__ import annotations

from pathlib import Path

import click
import requests

from hydraserve import devcluster
from hydraserve.cli.db import create_database, upgrade
from hydraserve.settings import Settings


@click.group()
def cluster() -> None:
    """Run a local cluster on this machine."""


@cluster.command("up")
def up() -> None:
    """Migrate, make the demo model, start the API, register and list the demo function."""
    settings = Settings.from_env()
    layout = devcluster.Layout(Path.cwd())
    layout.run.mkdir(exist_ok=True)
    step("database", lambda: (create_database(settings.database_url),
                              upgrade(settings.database_url)))
    uris = step("demo model", lambda: devcluster.ensure_demo_models(settings))
    key = devcluster.admin_key(layout)
    try:
        base = step("API (gunicorn)", lambda: devcluster.start_api(layout, settings, key))
        fns = step("demo function", lambda: devcluster.register_demo_functions(base, key, uris))
    except devcluster.ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    listed = requests.get(f"{base}/v1/functions", headers={"Authorization": f"Bearer {key}"},
                          timeout=30).json()["data"]
    click.echo("")
    click.echo(f"API:        {base}   (logs: {layout.logfile('api')})")
    click.echo(f"admin key:  {key}")
    for fn in listed:
        m = fn["spec"]["model"]
        click.echo(f"function:   {fn['name']}  v{fn['alias_version']}  {m['architecture']}  "
                   f"{m['num_parameters']:,} params  {m['total_bytes']:,} bytes  {m['uri']}")
    assert {f["name"] for f in fns} <= {f["name"] for f in listed}, (fns, listed)
    click.echo("")
    click.echo("try:")
    click.echo(f"  curl -s -H 'Authorization: Bearer {key}' {base}/v1/functions")
    click.echo(f"  curl -s -H 'Authorization: Bearer {key}' {base}/v1/functions/demo-llama")
    click.echo("stop with: make down")


@cluster.command("down")
def down() -> None:
    """Stop every process that ``up`` started."""
    layout = devcluster.Layout(Path.cwd())
    stopped = [name for name in ("api",) if devcluster.stop(layout, name)]
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


def step(what: str, fn):
    click.echo(f"==> {what} ... ", nl=False)
    result = fn()
    click.echo("ok")
    return result
