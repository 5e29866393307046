"""Loading a stage from a local HF checkpoint directory, tensor by tensor.

The same per-tensor entry point (``Stage.load_tensor``) serves the zero-copy loader of the
cold-start path, which feeds it tensors that alias the prefetcher's shared-memory buffers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from gpu_runtime.checkpoint import index_checkpoint
from gpu_runtime.config import DTYPES, ModelConfig, parse_config
from gpu_runtime.errors import RuntimeInputError
from gpu_runtime.stage import Stage, StageSpec, build_stage, split_stages


def resolve_dtype(name: str | None, config: ModelConfig) -> torch.dtype:
    """``--dtype`` name (or the checkpoint's own dtype when None) -> torch dtype."""
    name = name or config.torch_dtype
    if name not in DTYPES:
        raise RuntimeInputError(f"dtype {name!r} is not supported; allowed {tuple(DTYPES)}",
                                "dtype")
    return DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan_stages(model_dir: str | Path, pp: int) -> tuple[ModelConfig, list[StageSpec], dict]:
    """(config, stage specs, tensor name -> file) of a local checkpoint."""
    index = index_checkpoint(Path(model_dir).resolve().as_uri(), checksums=False)
    config = parse_config(index.config)
    files = {t.name: t.file for t in index.tensors}
    return config, split_stages(config, index.tensors, pp), files


def load_tensors(stage: Stage, model_dir: str | Path, names: Iterable[str],
                 files: dict) -> None:
    """Sets ``names`` (HF tensor names; ``files``: name -> file) on ``stage`` from the
    checkpoint's safetensors files, one file open at a time."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for name in names:
        by_file[files[name]].append(name)
    for fname, in_file in by_file.items():
        with safe_open(str(Path(model_dir) / fname), framework="pt", device="cpu") as f:
            for name in in_file:
                stage.load_tensor(name, f.get_tensor(name))


def load_stage(model_dir: str | Path, spec: StageSpec, config: ModelConfig, files: dict,
               dtype: torch.dtype, device: torch.device | str | None = None) -> Stage:
    """Builds ``spec``'s skeleton on meta and fills it from the safetensors files."""
    stage = build_stage(config, spec, dtype, device or default_device())
    load_tensors(stage, model_dir, spec.tensor_names, files)
    missing = stage.missing()
    assert not missing, f"stage {spec.index}: parameters never loaded: {missing[:5]}"
    stage.fuse_projections()  # on CUDA: q/k/v and gate/up, one projection each
    return stage


def load_checkpoint(model_dir: str | Path, dtype: str | None = None,
                    device: torch.device | str | None = None) -> Stage:
    """The whole model as a single stage (``pp = 1``)."""
    config, specs, files = plan_stages(model_dir, 1)
    return load_stage(model_dir, specs[0], config, files, resolve_dtype(dtype, config), device)
