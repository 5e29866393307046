"""Model configuration read from a Hugging Face ``config.json``: one typed, validated view over
the keys the runtime uses, for every supported architecture."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpu_runtime.errors import UnsupportedModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral",
                 "OPTForCausalLM": "opt"}
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}",
                "rope_scaling")
        if self.theta <= 0 or self.factor <= 0:
            raise UnsupportedModelError(
                f"rope_theta {self.theta} and rope factor {self.factor} must be > 0", "rope_scaling")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise UnsupportedModelError(
                f"llama3 rope needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}", "rope_scaling")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    arch: str  # a value of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()
    norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)
    word_embed_proj_dim: int = 0  # OPT only; 0 means "same as hidden_size"
    attention_bias: bool = False  # q/k/v projections
    output_bias: bool = False  # o_proj (Llama family) / out_proj (OPT)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of each q and k head, before RoPE
    # each token of a sliding layer attends to the last ``sliding_window`` positions, its own
    # included (HF: ``kv_idx > q_idx - sliding_window``); other layers see the whole context
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        assert self.arch in ARCHITECTURES.values(), f"arch {self.arch!r}"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"config {name}={getattr(self, name)} must be > 0", name)
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                f"{self.num_kv_heads}", "num_key_value_heads")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise UnsupportedModelError(
                f"sliding_window={self.sliding_window} must be > 0 (or null: no window)",
                "sliding_window")
        assert self.sliding_window is not None or not self.sliding_layers, (
            f"sliding layers {self.sliding_layers} without a window")
        assert all(0 <= i < self.num_layers for i in self.sliding_layers), (
            f"sliding layers {self.sliding_layers} outside 0..{self.num_layers - 1}")

    def window_of(self, layer: int) -> int | None:
        """Sliding-window size of decoder layer ``layer``; None: full causal attention."""
        return self.sliding_window if layer in self.sliding_layers else None

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT's ``word_embed_proj_dim`` may differ from hidden)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _rope_config(raw: dict) -> RopeConfig:
    # transformers 4.x writes ``rope_scaling`` + ``rope_theta``; 5.x may write ``rope_parameters``
    params = dict(raw.get("rope_parameters") or {})
    params |= dict(raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    return RopeConfig(
        theta=theta, rope_type=rope_type, factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get(
            "original_max_position_embeddings", raw.get("max_position_embeddings", 8192))))


def _eos_ids(raw: dict) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def parse_config(raw: dict) -> ModelConfig:
    """Typed config from a parsed ``config.json``; raises UnsupportedModelError on what we lack."""
    archs = raw.get("architectures") or []
    # the model_type names the family only when no architecture is named
    arch = ARCHITECTURES.get(archs[0], "") if archs else str(raw.get("model_type", ""))
    if arch not in ARCHITECTURES.values():
        raise UnsupportedModelError(
            f"architecture {archs or raw.get('model_type')!r} is not supported; supported: "
            f"{sorted(ARCHITECTURES)}", "model")
    if arch == "opt":
        return _opt_config(raw)
    return _llama_family_config(raw, arch)


def _llama_family_options(raw: dict, arch: str) -> dict:
    """What distinguishes the Llama-family architectures, as transformers builds them: Qwen2
    always has q/k/v biases and never an o_proj bias, whatever the config says; Qwen3's
    ``attention_bias`` covers all four projections (Llama's too) and it norms q and k per head;
    Mistral has no biases."""
    bias = bool(raw.get("attention_bias", False))
    window, layers = _sliding_window(raw, arch)
    options: dict = {"sliding_window": window, "sliding_layers": layers}
    if arch == "llama":
        options |= {"attention_bias": bias, "output_bias": bias,
                    "mlp_bias": bool(raw.get("mlp_bias", False))}
    elif arch == "qwen2":
        options |= {"attention_bias": True}
    elif arch == "qwen3":
        options |= {"attention_bias": bias, "output_bias": bias, "qk_norm": True}
    return options


def _sliding_window(raw: dict, arch: str) -> tuple[int | None, tuple[int, ...]]:
    """(window, sliding layer indices). Mistral slides every layer when ``sliding_window`` is
    set (transformers ignores ``layer_types`` for it). Qwen2/Qwen3 slide only with
    ``use_sliding_window``, on the layers ``layer_types`` names, or by default on layers
    ``max_window_layers`` and up (transformers' rule; released models set the flag false)."""
    num_layers = raw["num_hidden_layers"]
    window = raw.get("sliding_window")
    if arch == "llama" or window is None:
        return None, ()
    if arch in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        return None, ()
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise UnsupportedModelError(
            f"sliding_window={window!r} must be a positive integer or null", "sliding_window")
    if arch == "mistral":
        return window, tuple(range(num_layers))
    first_sliding = raw.get("max_window_layers", 28)  # transformers' default
    types = raw.get("layer_types") or [
        "sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers or not set(types) <= set(LAYER_TYPES):
        raise UnsupportedModelError(
            f"layer_types {types!r} must list one of {LAYER_TYPES} per layer "
            f"({num_layers} layers)", "layer_types")
    return window, tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def _llama_family_config(raw: dict, arch: str) -> ModelConfig:
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(
            f"{arch} hidden_act {raw['hidden_act']!r} is not supported; only 'silu'", "model")
    heads = raw["num_attention_heads"]
    return ModelConfig(
        arch=arch, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
        num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position_embeddings=raw["max_position_embeddings"],
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=_eos_ids(raw), norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=_rope_config(raw), **_llama_family_options(raw, arch),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"))


def _opt_config(raw: dict) -> ModelConfig:
    if not raw.get("do_layer_norm_before", True):
        raise UnsupportedModelError("OPT with do_layer_norm_before=false (opt-350m style) is "
                                    "not supported; only pre-LayerNorm OPT", "model")
    if raw.get("activation_function", "relu") != "relu":
        raise UnsupportedModelError(
            f"OPT activation {raw['activation_function']!r}; only 'relu'", "model")
    heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
    return ModelConfig(
        arch="opt", vocab_size=raw["vocab_size"], hidden_size=hidden,
        intermediate_size=raw["ffn_dim"], num_layers=raw["num_hidden_layers"], num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=raw["max_position_embeddings"],
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        eos_token_ids=_eos_ids(raw), norm_eps=1e-5,
        word_embed_proj_dim=raw.get("word_embed_proj_dim") or hidden,
        attention_bias=bool(raw.get("enable_bias", True)),
        output_bias=bool(raw.get("enable_bias", True)), mlp_bias=bool(raw.get("enable_bias", True)),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"))


def load_config(model_dir: str | Path) -> ModelConfig:
    return parse_config(json.loads((Path(model_dir) / "config.json").read_text()))
