"""``hydraserve functions``: the registry over REST, as any client would use it."""

from __future__ import annotations

import json

import click
import requests

API_URL = "http://127.0.0.1:8000"


class Api:
    def __init__(self, url: str, key: str | None) -> None:
        if not key:
            raise click.UsageError("no API key: pass --key or set HYDRA_API_KEY")
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"}

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            resp = requests.request(method, self.url + path, json=body, headers=self.headers,
                                    timeout=300)
        except requests.RequestException as exc:
            raise click.ClickException(f"cannot reach the API at {self.url}: {exc}") from None
        data = resp.json() if resp.content else {}
        if resp.status_code >= 400:
            err = data.get("error", {})
            raise click.ClickException(f"HTTP {resp.status_code} {err.get('type')}: {err.get('message')}")
        return data


@click.group()
@click.option("--api-url", envvar="HYDRA_API_URL", default=API_URL, show_default=True)
@click.option("--key", envvar="HYDRA_API_KEY", help="API key (or HYDRA_API_KEY)")
@click.pass_context
def functions(ctx: click.Context, api_url: str, key: str | None) -> None:
    """Register, list and delete model functions."""
    ctx.obj = (api_url, key)


def api(ctx: click.Context) -> Api:
    return Api(*ctx.obj)


@functions.command("register")
@click.argument("name")
@click.option("--model", "model_uri", required=True, help="file:///dir or http(s)://host/dir")
@click.option("--ttft-ms", type=int, required=True)
@click.option("--tpot-ms", type=int, required=True)
@click.option("--keep-alive-s", type=int, default=None)
@click.option("--min-instances", type=int, default=None)
@click.option("--max-instances", type=int, default=None)
@click.pass_context
def register(ctx: click.Context, name: str, model_uri: str, ttft_ms: int, tpot_ms: int,
             keep_alive_s: int | None, min_instances: int | None, max_instances: int | None) -> None:
    """Register function NAME."""
    body: dict = {"model": model_uri, "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms}}
    extra = {"keep_alive_s": keep_alive_s, "min_instances": min_instances,
             "max_instances": max_instances}
    body |= {k: v for k, v in extra.items() if v is not None}
    click.echo(json.dumps(api(ctx).call("PUT", f"/v1/functions/{name}", body), indent=2))


@functions.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """List your functions."""
    for fn in api(ctx).call("GET", "/v1/functions")["data"]:
        spec = fn["spec"]
        click.echo(f"{fn['name']:24} v{fn['alias_version']:<3} {spec['model']['architecture']:18} "
                   f"ttft {spec['slo']['ttft_ms']} ms  tpot {spec['slo']['tpot_ms']} ms  "
                   f"{spec['model']['uri']}")


@functions.command("delete")
@click.argument("name")
@click.pass_context
def delete(ctx: click.Context, name: str) -> None:
    """Delete function NAME."""
    api(ctx).call("DELETE", f"/v1/functions/{name}")
    click.echo(f"deleted {name}")
