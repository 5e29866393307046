"""Building blocks shared by the architectures: linear layers, RMSNorm and rotary position
embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpu_runtime import kernels
from gpu_runtime.config import RopeConfig


def _onednn_inner_product():
    """oneDNN's inner product (``mkldnn::_linear_pointwise``) when this torch build has it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


# Float32 linear layers on CPU go to oneDNN's inner product, on the weight as it is stored (a
# plain row-major matrix: no reorder, no copy, so it still aliases the checkpoint's bytes).
# ``F.linear`` sends float32 to MKL's sgemm, which on the 2-core AVX-512 bench machine takes
# 1.8x (1 row), 1.6x (8 rows) and 1.2-1.4x (64-512 rows) as long for the benchmark model's
# matrices. oneDNN's call costs ~13 us more (its primitive lookup), which loses on small
# matrices: below ONEDNN_MIN_WEIGHT elements (~512 x 1024, where the two break even in one
# thread) ``F.linear`` stays. bf16 ``F.linear`` already runs oneDNN, and the op has no fp16
# kernel here, so both keep ``F.linear``. None: every dtype uses ``F.linear``.
ONEDNN_LINEAR = _onednn_inner_product()
ONEDNN_MIN_WEIGHT = 1 << 19


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, by the fastest kernel this build has for the dtype, device and
    size."""
    if (ONEDNN_LINEAR is not None and x.dtype == torch.float32 and x.device.type == "cpu"
            and weight.numel() >= ONEDNN_MIN_WEIGHT):
        return ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same checkpoint names) computed by ``linear``; built
    without gradients."""

    def __init__(self, n_in: int, n_out: int, bias: bool) -> None:
        super().__init__(n_in, n_out, bias=bias)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


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
        native = kernels.rms_norm(x, self.weight, self.eps)
        return self._torch(x) if native is None else native[1]

    def add_forward(self, x: torch.Tensor,
                    delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, RMSNorm(x + delta)): the residual add and the norm after it, one pass
        on the native path."""
        native = kernels.rms_norm(x, self.weight, self.eps, delta)
        if native is not None:
            return native
        total = x + delta
        return total, self._torch(total)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32 as the reference does, then back to the input dtype, then the
        # weight; one fused kernel when the input already is float32
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, hd); rotate-half convention of the HF Llama checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on queries and keys in one pass: (tokens, heads, hd), (tokens, kv_heads, hd).
    Natively in place for a few tokens; else one concatenation, which costs less than running
    the elementwise kernels twice."""
    if kernels.rope_qk(q, k, cos, sin):
        return q, k
    heads = q.shape[1]
    qk = apply_rope(torch.cat((q, k), dim=1), cos, sin)  # (tokens, heads + kv_heads, hd)
    return qk[:, :heads], qk[:, heads:]
