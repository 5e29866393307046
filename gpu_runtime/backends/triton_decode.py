"""Decode attention on CUDA in Triton: one query token per sequence over its paged KV cache, read
through the block table in place (no gathered copy of the context), in one launch whose shapes
do not depend on the context lengths, so a decode step can be captured in a CUDA graph.

Design: one program per (query head, sequence), heads fastest so the programs of one GQA
group run side by side and share their keys and values in L2. A program loops over its
sequence's context ``BLOCK_N`` tokens at a time, up to the length it reads from
``context_lens`` on the device (no host sync): each token's cache row is found through the
block table (block ``table[pos // block_size]``, offset ``pos % block_size``), so any block
size works and the entries past a sequence's context are never read. Softmax is online (running
max and sum, in float32, base 2 with ``scale * log2(e)`` folded into q); the output is rounded
to q's dtype once. A sequence with context length 0 (a padded row of a captured batch) gets
zeros. Products and sums are elementwise in float32 rather than ``tl.dot``: one query row per
head is far below a tensor-core tile, and decode is bound by reading the cache.

Before capturing a graph, call once outside it with the same dtypes and head sizes: the first
call compiles the kernel.

Triton is optional: this module imports without it (``available`` says whether the kernel can
run) and only the CUDA path imports it. ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors
(Triton's interpreter, for the tests); the kernel is built on first use, once per mode.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: available() is False and the kernel is never built
    triton = tl = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2E = 1.4426950408889634


def is_interpreting() -> bool:
    """Whether Triton's interpreter is asked for (read by ``triton.jit`` when it builds)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available() -> bool:
    """Whether the kernel can run here: Triton imports, and a CUDA device exists or the
    interpreter is asked for."""
    return triton is not None and (torch.cuda.is_available() or is_interpreting())


def _decode_kernel(q_ptr, kv_ptr, table_ptr, ctx_ptr, out_ptr, qk_scale, window,
                   stride_qs, stride_qh, stride_kv, stride_kb, stride_kt, stride_kh,
                   stride_ts, stride_os, stride_oh,
                   GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    head = tl.program_id(0)
    seq = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qs + head * stride_qh + dims, mask=dim_ok, other=0.0)
    q = q.to(tl.float32) * qk_scale  # scores come out in base 2: exp2 below
    lo = 0  # first position the query sees
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    m = tl.full([], float("-inf"), tl.float32)  # running max of the scores
    denom = tl.zeros([], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_D], tl.float32)  # running sum of exp2(score - m) * value
    kv_head_ptr = kv_ptr + (head // GROUP) * stride_kh
    table_row = table_ptr + seq * stride_ts
    offsets = tl.arange(0, BLOCK_N)
    for start in range(lo - lo % BLOCK_N, ctx, BLOCK_N):
        pos = start + offsets
        seen = (pos >= lo) & (pos < ctx)
        # masked: table entries and cache rows past the context (or before the window) are
        # never touched, whatever they hold
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=seen, other=0).to(tl.int64)
        rows = block * stride_kb + (pos % BLOCK_SIZE) * stride_kt  # (BLOCK_N,)
        ptrs = kv_head_ptr + rows[:, None] + dims[None, :]  # (BLOCK_N, BLOCK_D)
        tile_ok = seen[:, None] & dim_ok[None, :]
        k = tl.load(ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        scores = tl.where(seen, tl.sum(k * q[None, :], axis=1), float("-inf"))  # (BLOCK_N,)
        # every tile holds a seen position, so m_new is finite and alpha is 0 on the first
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new)
        v = tl.load(ptrs + stride_kv, mask=tile_ok, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        denom = denom * alpha + tl.sum(p, axis=0)
        m = m_new
    out = acc / tl.where(denom > 0, denom, 1.0)  # context 0: no key, zeros
    tl.store(out_ptr + seq * stride_os + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The jitted kernel; ``interpret`` is a cache key only (``triton.jit`` reads the
    environment), so a process that switches modes gets one kernel per mode."""
    assert triton is not None, "triton is not importable; check available() first"
    return triton.jit(_decode_kernel)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """q (seqs, heads, hd), one query token per sequence (its key and value already in the
    cache) over kv_cache (2, num_blocks, block_size, kv_heads, hd) through block_tables
    (seqs, width) and context_lens (seqs,) (int32 or int64, on q's device) -> (seqs,
    heads * hd) in q's dtype. ``sliding_window``: keys at positions > ctx - 1 - window only.

    Only shapes, dtypes and devices are checked (no value is read back, so the call can be
    captured in a CUDA graph): block ids must lie in [0, num_blocks) for each sequence's first
    ceil(ctx / block_size) columns, and ctx in [0, width * block_size]; entries past that are
    never read."""
    _check(q, kv_cache, block_tables, context_lens, sliding_window)
    seqs, heads, head_dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    out = torch.empty((seqs, heads * head_dim), dtype=q.dtype, device=q.device)
    if seqs == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    block_n = 64 if block_d <= 64 else 32  # keeps a (BLOCK_N, BLOCK_D) float32 tile ~4K
    out_rows = out.view(seqs, heads, head_dim)
    _kernel(is_interpreting())[(heads, seqs)](
        q, kv_cache, block_tables, context_lens, out_rows, scale * LOG2E,
        sliding_window or 0,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3), block_tables.stride(0), out_rows.stride(0), out_rows.stride(1),
        GROUP=heads // kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=block_n, HAS_WINDOW=sliding_window is not None)
    return out


def _check(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
           context_lens: torch.Tensor, sliding_window: int | None) -> None:
    """Raises ValueError on a shape, dtype, layout or device the kernel does not take."""
    if not available():
        raise RuntimeError("the Triton decode kernel needs triton and a CUDA device (or "
                           "TRITON_INTERPRET=1 for CPU tensors); check available() first")
    if q.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"q {tuple(q.shape)} must be (seqs, heads, hd) and kv_cache "
                         f"{tuple(kv_cache.shape)} (2, num_blocks, block_size, kv_heads, hd)")
    seqs, heads, head_dim = q.shape
    kv_heads = kv_cache.shape[3]
    if kv_cache.shape[4] != head_dim or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)}: "
                         "head_dim must match and heads be a multiple of kv_heads")
    if tuple(block_tables.shape[:1]) != (seqs,) or block_tables.dim() != 2 or \
            tuple(context_lens.shape) != (seqs,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} must be (seqs, width) and "
                         f"context_lens {tuple(context_lens.shape)} (seqs,), seqs = {seqs}")
    for name, t in (("q", q), ("kv_cache", kv_cache)):
        if t.dtype not in DTYPES or t.stride(-1) != 1:
            raise ValueError(f"{name} is {t.dtype} with last stride {t.stride(-1)}; the kernel "
                             f"takes {DTYPES} with contiguous head_dim")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype not in (torch.int32, torch.int64) or t.stride(-1) != 1:
            raise ValueError(f"{name} is {t.dtype} with last stride {t.stride(-1)}; the kernel "
                             "takes int32 or int64 with contiguous rows")
    devices = {t.device for t in (q, kv_cache, block_tables, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"q, kv_cache, block_tables and context_lens on {devices}: one device")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1 (None: no window)")
