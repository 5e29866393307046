"""One file per architecture. A model file defines modules and its HF weight-name table; it
knows nothing of pipelines, stages or transport (see ``gpu_runtime.stage``)."""

from __future__ import annotations

import importlib
import re
from types import ModuleType

from torch import nn

from gpu_runtime.config import ModelConfig

# an architecture's HF weight-name table: (pattern, parameter path template, role), the role
# being embed, layer (the pattern's first group is the layer index) or head
WeightMap = tuple[tuple[re.Pattern, str, str], ...]

# config.arch -> (module of gpu_runtime.models, its model class). Qwen2, Qwen3 and Mistral are
# the Llama module under other config options: same math, same tensor names.
MODULES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("llama", "LlamaForCausalLM"),
    "qwen3": ("llama", "LlamaForCausalLM"),
    "mistral": ("llama", "LlamaForCausalLM"),
    "opt": ("opt", "OPTForCausalLM"),
}


def model_module(config: ModelConfig) -> ModuleType:
    """The architecture module (``llama`` or ``opt``) for ``config``."""
    return importlib.import_module(f"gpu_runtime.models.{MODULES[config.arch][0]}")


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The model class that builds ``config``'s architecture."""
    return getattr(model_module(config), MODULES[config.arch][1])


def match_weight(weight_map: WeightMap, tied: bool, hf_name: str,
                 family: str) -> tuple[str, list[str]]:
    """(role, parameter paths) of one HF tensor by an architecture's name table: ``layer:<i>``
    for a decoder layer's tensor, ``tied`` for the token embedding when the LM head shares it
    (both paths), otherwise the table's role. ``family`` names the architecture in the error."""
    for pattern, template, role in weight_map:
        m = pattern.fullmatch(hf_name)
        if not m:
            continue
        path = template.format(*m.groups())
        if role == "layer":
            return f"layer:{m.group(1)}", [path]
        if role == "embed" and tied and path == "embed_tokens.weight":
            return "tied", [path, "lm_head.weight"]
        return role, [path]
    raise KeyError(f"tensor {hf_name!r} is not part of {family} checkpoint")
