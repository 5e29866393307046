"""``hydraserve make-demo-model``: random-weight checkpoints in the HF layout."""

from __future__ import annotations

import click

from gpu_runtime.demo_model import ARCHITECTURES, DTYPES, SIZES, DemoModelSpec
from gpu_runtime.demo_model import make_demo_model as make


@click.command("make-demo-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(ARCHITECTURES), default="llama", show_default=True)
@click.option("--size", type=click.Choice(SIZES), default="tiny", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shard-mb", type=int, default=None, help="split weights into files of ~N MB")
def make_demo_model(directory: str, arch: str, size: str, dtype: str, seed: int,
                    shard_mb: int | None) -> None:
    """Write a random-weight ARCH checkpoint (config, safetensors, tokenizer) to DIRECTORY."""
    spec = DemoModelSpec(arch=arch, size=size, dtype=dtype, seed=seed,
                         shard_bytes=shard_mb * 2**20 if shard_mb else None)
    path = make(directory, spec)
    click.echo(f"wrote {arch}/{size}/{dtype} checkpoint to {path}")
