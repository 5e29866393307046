"""One file per architecture. A model file defines modules and its HF weight-name table; it
knows nothing of pipelines, stages or transport (see ``gpu_runtime.stage``)."""

from __future__ import annotations

from types import ModuleType

from gpu_runtime.config import ModelConfig


def model_module(config: ModelConfig) -> ModuleType:
    """The architecture module (``llama`` or ``opt``) for ``config``."""
    from gpu_runtime.models import llama, opt

    return {"llama": llama, "opt": opt}[config.arch]
