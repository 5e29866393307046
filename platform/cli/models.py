"""``hydraserve make-demo-model`` (random-weight checkpoints in the HF layout) and
``hydraserve models import-gguf`` (a llama.cpp GGUF file as an HF checkpoint)."""

from __future__ import annotations

from pathlib import Path

import click

from gpu_runtime.demo_model import ARCHITECTURES, DTYPES, SIZES, DemoModelSpec
from gpu_runtime.demo_model import make_demo_model as make
from gpu_runtime.errors import UnsupportedModelError


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


@click.group()
def models() -> None:
    """Model checkpoints: convert them into the HF layout the platform serves."""


@models.command("import-gguf")
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True,
              help="dtype of the safetensors (float32 keeps the dequantised values exactly)")
@click.option("--shard-mb", type=click.IntRange(min=1), default=2048, show_default=True,
              help="split weights into files of at most ~N MB")
def import_gguf(gguf_file: str, directory: str, dtype: str, shard_mb: int) -> None:
    """Convert a Llama-family GGUF_FILE (F32, F16, BF16, Q8_0, Q4_0, Q4_1 tensors) into an HF
    checkpoint in DIRECTORY: config.json, safetensors, tokenizer.json, tokenizer_config.json
    (with the chat template) and generation_config.json."""
    from gpu_runtime.gguf_import import convert_gguf

    try:
        out = convert_gguf(gguf_file, directory, dtype=dtype, shard_bytes=shard_mb * 2**20)
    except UnsupportedModelError as exc:
        raise click.ClickException(exc.message) from None
    files = sorted(p.name for p in Path(out).iterdir())
    click.echo(f"wrote {dtype} checkpoint of {gguf_file} to {out}: {', '.join(files)}")
