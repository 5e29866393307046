"""Pipeline stages: the byte-balanced split (a pure function over the tensor index) and a stage
built from a full model definition by keeping a slice of its layers, gpt-fast style.

Stage 0 holds the embeddings, the last stage the final norm and LM head; a tied embedding goes
to both ends. A whole model is simply the one stage of a ``pp = 1`` split.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from gpu_runtime.attention import AttentionMetadata
from gpu_runtime.config import ModelConfig
from gpu_runtime.errors import RuntimeInputError
from gpu_runtime.kv_cache import KVCache
from gpu_runtime.limits import MAX_PP
from gpu_runtime.models import model_class, model_module


class TensorInfo(Protocol):  # what the split reads: checkpoint.TensorEntry satisfies it
    @property
    def name(self) -> str: ...

    @property
    def length(self) -> int: ...


class CausalLM(Protocol):
    """What a stage needs from an architecture's model class (``models/*.py``)."""

    config: ModelConfig
    layers: nn.ModuleDict

    def prepare(self, meta: AttentionMetadata, dtype: torch.dtype) -> Any: ...

    def embed(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor: ...

    def final(self, h: torch.Tensor) -> torch.Tensor: ...

    def get_submodule(self, target: str) -> nn.Module: ...

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class StageSpec:
    index: int
    num_stages: int
    layer_start: int  # global layer indices [layer_start, layer_end)
    layer_end: int
    tensor_names: tuple[str, ...]  # HF names this stage loads, in checkpoint order
    num_bytes: int

    def __post_init__(self) -> None:
        assert 0 <= self.index < self.num_stages, f"stage {self.index} of {self.num_stages}"
        assert 0 <= self.layer_start < self.layer_end, (
            f"stage {self.index}: empty layer range {self.layer_start}..{self.layer_end}")

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def layers(self) -> range:
        return range(self.layer_start, self.layer_end)


def tensor_roles(config: ModelConfig, tensors: Iterable[TensorInfo]) -> list[tuple[str, str, int]]:
    """(name, role, bytes) per tensor; role is embed, head, tied (both ends) or layer:<i>."""
    module = model_module(config)
    return [(t.name, module.param_paths(config, t.name)[0], t.length) for t in tensors]


def _partition(layer_bytes: list[int], head: int, tail: int, pp: int) -> list[int]:
    """Cut points (pp + 1 of them) of consecutive layers that minimise the largest stage total,
    where stage 0 also carries ``head`` bytes and the last stage ``tail`` bytes."""
    n = len(layer_bytes)
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)
    # best[k][j]: smallest max-stage-bytes splitting the first j layers into k stages
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0
    for k in range(1, pp + 1):
        for j in range(k, n - (pp - k) + 1):
            for i in range(k - 1, j):
                size = prefix[j] - prefix[i] + (head if k == 1 else 0) + (tail if k == pp else 0)
                cost = max(best[k - 1][i], size)
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    cuts = [n]
    for k in range(pp, 0, -1):
        cuts.append(cut[k][cuts[-1]])
    return cuts[::-1]


def split_stages(config: ModelConfig, tensors: Sequence[TensorInfo], pp: int) -> list[StageSpec]:
    """Splits a checkpoint into ``pp`` stages of consecutive layers, balanced by bytes."""
    if not 1 <= pp <= min(MAX_PP, config.num_layers):
        raise RuntimeInputError(
            f"pipeline size pp={pp} is out of range; allowed 1..{min(MAX_PP, config.num_layers)} "
            f"(at most {MAX_PP} and at most the {config.num_layers} layers)", "pp")
    roles = tensor_roles(config, tensors)
    layer_bytes = [0] * config.num_layers
    head = tail = 0
    for _, role, size in roles:
        if role.startswith("layer:"):
            layer_bytes[int(role[6:])] += size
        head += size if role in ("embed", "tied") else 0
        tail += size if role in ("head", "tied") else 0
    cuts = _partition(layer_bytes, head, tail, pp)
    specs = []
    for s in range(pp):
        start, end = cuts[s], cuts[s + 1]
        names = [name for name, role, _ in roles if _stage_needs(role, s, pp, start, end)]
        size = sum(b for name, role, b in roles if _stage_needs(role, s, pp, start, end))
        specs.append(StageSpec(s, pp, start, end, tuple(names), size))
    return specs


def _stage_needs(role: str, s: int, pp: int, start: int, end: int) -> bool:
    if role.startswith("layer:"):
        return start <= int(role[6:]) < end
    return ((role in ("embed", "tied") and s == 0) or (role in ("head", "tied") and s == pp - 1))


class Stage(nn.Module):
    """A model with only layers ``spec.layers`` kept. Parameters start on ``meta``; each is set
    from one HF tensor by ``load_tensor``, which aliases the given tensor when its dtype and
    device already match (zero-copy) and converts otherwise."""

    def __init__(self, model: nn.Module, spec: StageSpec, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.model: CausalLM = cast(CausalLM, model)
        config = self.model.config
        assert spec.layer_end <= config.num_layers, f"{spec} beyond {config.num_layers} layers"
        for key in [k for k in self.model.layers if int(k) not in spec.layers]:
            del self.model.layers[key]
        self.spec, self.config = spec, config
        self.dtype, self.device = dtype, torch.device(device)
        self.layer_list = list(self.model.layers.values())  # avoid ModuleDict lookups per step
        self._module = model_module(config)
        self._needed = {p for n in spec.tensor_names
                        for p in self._module.param_paths(config, n)[1]}

    def load_tensor(self, hf_name: str, tensor: torch.Tensor) -> None:
        """Sets the parameter(s) that HF tensor ``hf_name`` maps to, ``assign=True`` style."""
        paths = [p for p in self._module.param_paths(self.config, hf_name)[1] if p in self._needed]
        if not paths:
            return
        if tensor.dtype != self.dtype or tensor.device != self.device:
            tensor = tensor.to(self.device, self.dtype)  # the only copy, when formats differ
        param = nn.Parameter(tensor, requires_grad=False)
        for path in paths:  # a tied embedding sets two paths to the same Parameter
            owner_path, _, leaf = path.rpartition(".")
            owner = self.model.get_submodule(owner_path)
            current = owner._parameters[leaf]
            assert current is not None, f"{path} is not a parameter"
            expected = current.shape
            assert tuple(expected) == tuple(tensor.shape), (
                f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(expected)}")
            owner._parameters[leaf] = param

    def adopt(self, other: Stage) -> int:
        """Takes every loaded parameter of ``other`` (a stage of the same model) that this
        stage needs, as the same tensor (no copy); returns how many."""
        taken = 0
        for path, param in other.model.named_parameters(remove_duplicate=False):
            if path in self._needed and not param.is_meta:
                owner_path, _, leaf = path.rpartition(".")
                self.model.get_submodule(owner_path)._parameters[leaf] = param
                taken += 1
        return taken

    def fuse_projections(self, force: bool = False) -> int:
        """Where each weight was copied onto the device anyway (not CPU, where parameters
        alias the node cache's bytes), q/k/v and gate/up become one projection each
        (``layers.FusedLinear``); ``force`` fuses on CPU too (tests). Returns how many
        modules were fused."""
        if self.device.type == "cpu" and not force:
            return 0
        fused = 0
        for module in cast(nn.Module, self.model).modules():
            fuse = getattr(module, "fuse", None)
            if callable(fuse):
                fuse()
                fused += 1
        return fused

    def missing(self) -> list[str]:
        """Parameter paths this stage needs that are still on ``meta``."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return sorted(p for p in self._needed if params[p].is_meta)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        """x: token ids (tokens,) on stage 0, else hidden (tokens, hidden) -> hidden."""
        aux = self.model.prepare(meta, self.dtype)
        h = self.model.embed(x, meta) if self.spec.is_first else x
        for layer, kv_cache in zip(self.layer_list, kv.layers, strict=True):
            h = layer(h, meta, aux, kv_cache)
        return h

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(rows, hidden) -> float32 logits (rows, vocab); last stage only."""
        assert self.spec.is_last, f"stage {self.spec.index} of {self.spec.num_stages} has no head"
        return self.model.final(h)


def build_stage(config: ModelConfig, spec: StageSpec, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> Stage:
    """Stage skeleton on the ``meta`` device: nothing allocated until ``load_tensor``."""
    with torch.device("meta"):
        model = model_class(config)(config)
    return Stage(model, spec, dtype, torch.device(device))
