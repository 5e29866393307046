"""Llama family: RMSNorm, RoPE (default / linear / llama3 scaling), grouped-query attention,
SwiGLU MLP, tied or untied embeddings. Parameters are one-to-one with HF checkpoint tensors so
each can alias the buffer holding that tensor's bytes (CPU); where weights are copied to the
device anyway (CUDA) the loader fuses q/k/v and gate/up into one projection each (``fuse``).

Qwen2/2.5, Qwen3 and Mistral are this model with other config options (``gpu_runtime.config``),
under the same tensor names: Qwen2 adds q/k/v biases, Qwen3 a per-head RMSNorm of q and k
before RoPE (``q_norm`` / ``k_norm``) and a ``head_dim`` of its own, Mistral a sliding window
(also Qwen2/3 with ``use_sliding_window``, on the layers the config names)."""

from __future__ import annotations

import re

import torch
from torch import nn

from gpu_runtime import backends
from gpu_runtime.attention import AttentionMetadata, paged_attention
from gpu_runtime.config import ModelConfig
from gpu_runtime.layers import (
    FusedLinear,
    Linear,
    RMSNorm,
    apply_rope_qk,
    rope_cos_sin,
    rope_inv_freq,
)
from gpu_runtime.models import WeightMap, match_weight

# HF tensor name -> our parameter path; ``{0}`` is the layer index. Tied embeddings add a
# second target (see ``param_paths``).
WEIGHT_MAP: WeightMap = (
    # (pattern, parameter path, role: embed | layer | head)
    (re.compile(r"model\.embed_tokens\.weight"), "embed_tokens.weight", "embed"),
    (re.compile(r"model\.layers\.(\d+)\.(.+)"), "layers.{0}.{1}", "layer"),
    (re.compile(r"model\.norm\.weight"), "norm.weight", "head"),
    (re.compile(r"lm_head\.weight"), "lm_head.weight", "head"),
)
IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # old checkpoints store a derivable buffer
FAMILY_NAMES = {"llama": "a Llama", "qwen2": "a Qwen2", "qwen3": "a Qwen3", "mistral": "a Mistral"}


class LlamaAttention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.kv_dim, c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.kv_dim, c.attention_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, c.output_bias)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None
        self.sliding_window = c.window_of(layer)
        self.qkv: FusedLinear | None = None  # set by fuse()

    def fuse(self) -> None:
        """One projection for q, k and v (``Stage.fuse_projections``)."""
        self.qkv = FusedLinear(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: tuple,
                kv_cache: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        if self.qkv is not None:
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(tokens, self.num_heads, self.head_dim)  # (tokens, heads, hd)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)  # (tokens, kv_heads, hd)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over head_dim, per head: shapes unchanged
        cos, sin = rope
        q, k = apply_rope_qk(q, k, cos, sin)
        return self.o_proj(paged_attention(q, k, v, kv_cache, meta, self.sliding_window))


class LlamaMLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, c.mlp_bias)
        self.gate_up: FusedLinear | None = None  # set by fuse()

    def fuse(self) -> None:
        """One projection for gate and up (``Stage.fuse_projections``)."""
        self.gate_up = FusedLinear(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(backends.for_device(x.device).silu_mul(gate, up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.self_attn = LlamaAttention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata, aux: tuple,
                kv_cache: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(h), meta, aux, kv_cache)
        h, x = self.post_attention_layernorm.add_forward(h, attn)  # residual add + norm
        return h + self.mlp(x)


class LlamaForCausalLM(nn.Module):
    """Module tree mirrors the HF names minus the ``model.`` prefix; layers are keyed by their
    global index so a stage holding layers 8..15 keeps the same names."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_tokens.requires_grad_(False)
        self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(c, i)
                                     for i in range(c.num_layers)})
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, False)
        self.inv_freq = rope_inv_freq(c.rope, c.head_dim)  # plain attribute: never on meta

    def prepare(self, meta: AttentionMetadata, dtype: torch.dtype) -> tuple:
        """Per-step tensors every layer shares: RoPE cos/sin of this step's positions."""
        return rope_cos_sin(self.inv_freq, meta.positions, dtype)

    def embed(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # (tokens, hidden)

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """Last-stage tail: final norm and LM head -> float32 logits (rows, vocab)."""
        return self.lm_head(self.norm(h)).float()


def param_paths(c: ModelConfig, hf_name: str) -> tuple[str, list[str]]:
    """(role, parameter paths) of one HF tensor; role is embed, tied, layer:<i>, head or
    ignored."""
    if IGNORED.fullmatch(hf_name):
        return "ignored", []
    return match_weight(WEIGHT_MAP, c.tie_word_embeddings, hf_name, FAMILY_NAMES[c.arch])
