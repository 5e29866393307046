"""OPT: learned positions (offset 2), pre-LayerNorm decoder layers, ReLU MLP, and
``project_in`` / ``project_out`` when ``word_embed_proj_dim`` differs from ``hidden_size``."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from gpu_runtime.attention import AttentionMetadata, paged_attention
from gpu_runtime.config import ModelConfig
from gpu_runtime.layers import Linear
from gpu_runtime.models import WeightMap, match_weight

POSITION_OFFSET = 2  # OPT's learned position table starts 2 rows in (fairseq legacy)

WEIGHT_MAP: WeightMap = (
    (re.compile(r"model\.decoder\.embed_tokens\.weight"), "embed_tokens.weight", "embed"),
    (re.compile(r"model\.decoder\.embed_positions\.weight"), "embed_positions.weight", "embed"),
    (re.compile(r"model\.decoder\.project_in\.weight"), "project_in.weight", "embed"),
    (re.compile(r"model\.decoder\.layers\.(\d+)\.(.+)"), "layers.{0}.{1}", "layer"),
    (re.compile(r"model\.decoder\.final_layer_norm\.(weight|bias)"), "final_layer_norm.{0}",
     "head"),
    (re.compile(r"model\.decoder\.project_out\.weight"), "project_out.weight", "head"),
    (re.compile(r"lm_head\.weight"), "lm_head.weight", "head"),
)


def _layer_norm(dim: int) -> nn.LayerNorm:
    norm = nn.LayerNorm(dim)
    norm.requires_grad_(False)
    return norm


class OPTAttention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.hidden_size, c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.hidden_size, c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.hidden_size, c.attention_bias)
        self.out_proj = Linear(c.hidden_size, c.hidden_size, c.output_bias)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)  # (tokens, heads, hd)
        k = self.k_proj(x).view(tokens, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_heads, self.head_dim)
        return self.out_proj(paged_attention(q, k, v, kv_cache, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.self_attn_layer_norm = _layer_norm(c.hidden_size)
        self.self_attn = OPTAttention(c)
        self.final_layer_norm = _layer_norm(c.hidden_size)
        self.fc1 = Linear(c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.fc2 = Linear(c.intermediate_size, c.hidden_size, c.mlp_bias)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata, aux: None,
                kv_cache: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.self_attn_layer_norm(h), meta, kv_cache)
        return h + self.fc2(F.relu(self.fc1(self.final_layer_norm(h))))


class OPTForCausalLM(nn.Module):
    """Module tree mirrors the HF names minus ``model.decoder.``; layers keyed by global index."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.config = c
        has_proj = c.embed_dim != c.hidden_size
        self.embed_tokens = nn.Embedding(c.vocab_size, c.embed_dim)
        self.embed_positions = nn.Embedding(c.max_position_embeddings + POSITION_OFFSET,
                                            c.hidden_size)
        self.project_in = Linear(c.embed_dim, c.hidden_size, False) if has_proj else None
        self.layers = nn.ModuleDict({str(i): OPTDecoderLayer(c) for i in range(c.num_layers)})
        self.final_layer_norm = _layer_norm(c.hidden_size)
        self.project_out = Linear(c.hidden_size, c.embed_dim, False) if has_proj else None
        self.lm_head = Linear(c.embed_dim, c.vocab_size, False)
        self.requires_grad_(False)

    def prepare(self, meta: AttentionMetadata, dtype: torch.dtype) -> None:
        return None  # positions enter once, at the embedding

    def embed(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (tokens, embed_dim)
        if self.project_in is not None:
            x = self.project_in(x)  # (tokens, hidden)
        return x + self.embed_positions(meta.positions + POSITION_OFFSET)

    def final(self, h: torch.Tensor) -> torch.Tensor:
        h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)  # (rows, embed_dim)
        return self.lm_head(h).float()


def param_paths(c: ModelConfig, hf_name: str) -> tuple[str, list[str]]:
    """(role, parameter paths) of one HF tensor; role is embed, tied, layer:<i> or head."""
    return match_weight(WEIGHT_MAP, c.tie_word_embeddings, hf_name, "an OPT")
