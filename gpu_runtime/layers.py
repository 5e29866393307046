"""Building blocks shared by the architectures: linear layers, RMSNorm and rotary position
embeddings. Their kernels are the device's backend's (``gpu_runtime.backends``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gpu_runtime import backends
from gpu_runtime.config import RopeConfig


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, by the fastest kernel the device's backend has for the dtype
    and size (float32 on CPU: oneDNN, ``backends.torch_backend``)."""
    return backends.for_device(x.device).linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same checkpoint names) computed by ``linear``; built
    without gradients."""

    def __init__(self, n_in: int, n_out: int, bias: bool) -> None:
        super().__init__(n_in, n_out, bias=bias)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class FusedLinear(nn.Module):
    """Several projections of one input as one matrix product: their weights (and biases)
    become row blocks of one tensor, and each original parameter a view of its block, so the
    fused weight costs no memory of its own once the originals' storage is released. Weights
    already adjacent in one storage (a stage that adopted another's fused weights) are viewed,
    not copied. Returns the projections' outputs, split (views of one output)."""

    def __init__(self, *projections: nn.Linear) -> None:
        super().__init__()
        self.sizes = [p.out_features for p in projections]
        self.weight = nn.Parameter(fuse_rows([p.weight for p in projections]),
                                   requires_grad=False)
        has_bias = [p.bias is not None for p in projections]
        assert all(has_bias) or not any(has_bias), "some projections have a bias, some not"
        self.bias = None if not has_bias[0] else nn.Parameter(
            fuse_rows([p.bias for p in projections]), requires_grad=False)
        start = 0
        for p, n in zip(projections, self.sizes, strict=True):  # the originals view the fused
            p.weight = nn.Parameter(self.weight[start:start + n], requires_grad=False)
            if self.bias is not None:
                p.bias = nn.Parameter(self.bias[start:start + n], requires_grad=False)
            start += n

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def fuse_rows(tensors: list) -> torch.Tensor:
    """``torch.cat(tensors)`` along rows, as a view when they already lie one after another in
    one contiguous storage."""
    first = tensors[0]
    end = first.data_ptr()
    adjacent = True
    for t in tensors:
        adjacent &= (t.is_contiguous() and t.data_ptr() == end and t.dtype == first.dtype
                     and t.shape[1:] == first.shape[1:]
                     and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr())
        end = t.data_ptr() + t.numel() * t.element_size()
    if not adjacent:
        return torch.cat([t.detach() for t in tensors])
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return first.as_strided(shape, torch.empty(shape, device="meta").stride())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (rows, dim), or (tokens, heads, head_dim) for a per-head norm (Qwen3's q/k),
        normed as (tokens * heads) rows so the native kernel applies to it too."""
        if x.dim() != 2:
            return self.forward(x.reshape(-1, x.shape[-1])).view(x.shape)
        return backends.for_device(x.device).rms_norm(x, self.weight, self.eps)[1]

    def add_forward(self, x: torch.Tensor,
                    delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, RMSNorm(x + delta)): the residual add and the norm after it, one pass
        on the native path."""
        return backends.for_device(x.device).rms_norm(x, self.weight, self.eps, delta)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, with linear or llama3 scaling applied."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponent)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type != "llama3":
        return inv_freq
    # llama 3.1: long wavelengths are divided by ``factor``, short ones kept, the middle
    # band interpolated smoothly between the two
    old_len = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / rope.low_freq_factor, old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (tokens,) -> cos, sin (tokens, 1, head_dim), computed once per step."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # (tokens, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (tokens, 1, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on queries (tokens, heads, hd) and keys (tokens, kv_heads, hd) in one pass, in
    place where the backend can (the native kernel, for a few tokens)."""
    return backends.for_device(q.device).rope_qk(q, k, cos, sin)
