"""``hydraserve store``: serve checkpoints over HTTP with Range, for local clusters."""

from __future__ import annotations

import click


@click.command("store")
@click.option("--root", required=True, type=click.Path(file_okay=False),
              help="directory holding model folders")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8300, show_default=True, type=click.IntRange(0, 65535))
@click.option("--verbose", is_flag=True, help="log every request")
def store(root: str, host: str, port: int, verbose: bool) -> None:
    """Serve the checkpoints under ROOT (GET/HEAD, 206 Range answers, 416 when unsatisfiable)."""
    from pathlib import Path

    from gpu_runtime.store.server import serve

    if not Path(root).is_dir():
        raise click.BadParameter(f"{root} is not a directory", param_hint="--root")
    click.echo(f"serving {root} on http://{host}:{port}")
    serve(root, host, port, verbose=verbose)
