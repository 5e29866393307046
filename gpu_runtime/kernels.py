"""Torch-facing wrappers of the native CPU kernels (``gpu_runtime.native``).

Each wrapper returns None (or False) when its kernel does not apply, and the caller runs its
torch code instead: no library (no compiler, ``HYDRA_NATIVE=0``), a CUDA tensor, a dtype other
than float32 / bfloat16 / float16, an unexpected layout, or, for the elementwise kernels, more
than ``MAX_TOKENS`` rows. The elementwise kernels are single-threaded; at decode sizes one pass
over a few KB costs less than torch's several multi-threaded eager kernels (each a dispatch, an
output allocation and a wake-up of the OpenMP threads), while a prefill of hundreds of tokens
is real work that torch's kernels spread over every core. Decode attention of a large batch
reads megabytes of cache per layer: it splits the batch in two over torch's own OpenMP
threads (``native``), up to ``torch.get_num_threads()``.

Rounding: the kernels compute in float32 and round to the tensor's dtype where the reference
(HF's eager modules) rounds, so results match it bit for bit except where a float32 sum or
``exp`` is evaluated in a different order (last-bit differences, see the kernel comments).
"""

from __future__ import annotations

import math

import torch

from gpu_runtime import native

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Row limits of the elementwise kernels; beyond them torch's kernels, which use every core,
# win. Measured on the 2-core bench machine with hidden 1024 / intermediate 2816: RMSNorm and
# RoPE are still ~2x faster natively at 32 rows, SiLU breaks even near 12. A single row's SiLU
# is as fast in torch's two small kernels (A/B within one process, bf16 batch 1: the native
# one cost 3% of a decode step; at batch 8 it saves 5%).
MAX_TOKENS = 32
SILU_TOKENS = range(2, 9)
# Threads decode attention may use (it splits a large batch in two, PAIR_MIN_WORK in csrc/attention.c); None: as
# many as torch's intra-op threads, so a worker given one core keeps to one.
ATTENTION_THREADS: int | None = None


def _lib(t: torch.Tensor):
    """The library, if loaded and ``t`` is a CPU tensor of a dtype the kernels know."""
    lib = native.load()
    if lib is None or t.device.type != "cpu" or t.dtype not in DTYPE_CODES:
        return None
    return lib


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor) -> torch.Tensor | None:
    """One decode step's attention, this step's k/v written into the cache first: q (seqs,
    heads, hd), k/v (seqs, kv_heads, hd), kv_cache (2, num_blocks, block_size, kv_heads, hd),
    slot_mapping (seqs,), block_tables (seqs, width) and context_lens (seqs,) int64 ->
    (seqs, heads * hd), or None when the kernel does not apply."""
    lib = _lib(q)
    if lib is None or not _rows_ok(q, k, v) or not kv_cache.is_contiguous():
        return None
    if kv_cache.dtype != q.dtype or not all(t.dtype == torch.int64 and t.is_contiguous()
                                            for t in (slot_mapping, block_tables, context_lens)):
        return None
    seqs, heads, hd = q.shape
    _, num_blocks, block_size, kv_heads, _ = kv_cache.shape
    # the kernel trusts these: a mismatch would read or write out of bounds
    assert k.shape == v.shape == (seqs, kv_heads, hd) == (seqs, *kv_cache.shape[3:]), (
        f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cache "
        f"{tuple(kv_cache.shape)}")
    assert (slot_mapping.numel() == seqs == block_tables.shape[0] == context_lens.numel()), (
        f"{seqs} sequences, slot mapping {slot_mapping.numel()}, block tables "
        f"{tuple(block_tables.shape)}, context lens {context_lens.numel()}")
    out = torch.empty(seqs, heads * hd, dtype=q.dtype)

    rc = lib.hydra_decode_attention(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        kv_cache.data_ptr(), num_blocks, block_size, slot_mapping.data_ptr(),
        block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(), seqs, heads,
        kv_heads, hd, DTYPE_CODES[q.dtype], 1.0 / math.sqrt(hd), out.data_ptr(),
        ATTENTION_THREADS or torch.get_num_threads())
    assert rc == 0, f"decode attention rejected its inputs: q {tuple(q.shape)}, cache " \
                    f"{tuple(kv_cache.shape)}, context lens {context_lens.tolist()}"
    return out


def _rows_ok(*tensors: torch.Tensor) -> bool:
    """(tokens, heads, hd) views whose heads are contiguous within a token (rows may be
    further apart, e.g. q and k sliced from one fused tensor)."""
    return all(t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]
               for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """RMSNorm of ``x`` (rows, dim), or of ``x + delta`` when given -> (the normed input's
    sum (x itself without delta), normed), or None when the kernel does not apply."""
    lib = _lib(x)
    if lib is None or x.dim() != 2 or x.shape[0] > MAX_TOKENS or not x.is_contiguous():
        return None
    if weight.dtype != x.dtype or not weight.is_contiguous():
        return None
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype
                              or not delta.is_contiguous()):
        return None
    out = torch.empty_like(x)
    total = x if delta is None else torch.empty_like(x)
    rc = lib.hydra_rms_norm(x.data_ptr(), None if delta is None else delta.data_ptr(),
                            weight.data_ptr(), total.data_ptr(), out.data_ptr(), x.shape[0],
                            x.shape[1], eps, DTYPE_CODES[x.dtype])
    assert rc == 0, f"rms_norm out of memory for {tuple(x.shape)}"
    return total, out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for (rows, dim) tensors, or None when the kernel does not apply."""
    lib = _lib(gate)
    if lib is None or gate.dim() != 2 or gate.shape[0] not in SILU_TOKENS:
        return None
    if up.shape != gate.shape or up.dtype != gate.dtype or not (gate.is_contiguous()
                                                                and up.is_contiguous()):
        return None
    out = torch.empty_like(gate)
    lib.hydra_silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(),
                       DTYPE_CODES[gate.dtype])
    return out


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """RoPE on q (tokens, heads, hd) and k (tokens, kv_heads, hd) in place with cos/sin
    (tokens, 1, hd); False (nothing changed) when the kernel does not apply."""
    lib = _lib(q)
    if lib is None or q.shape[0] > MAX_TOKENS or not _rows_ok(q, k):
        return False
    if not all(t.dtype == q.dtype for t in (k, cos, sin)) or not (cos.is_contiguous()
                                                                  and sin.is_contiguous()):
        return False
    tokens, heads, hd = q.shape
    rc = lib.hydra_rope_qk(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), cos.data_ptr(),
                           sin.data_ptr(), tokens, heads, k.shape[1], hd, DTYPE_CODES[q.dtype])
    return rc == 0


def logits_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """float32 logits (rows, vocab) -> (argmax (rows,) int64, log-sum-exp (rows,) float32), or
    None when the kernel does not apply."""
    lib = _lib(logits)
    if lib is None or logits.dtype != torch.float32 or logits.dim() != 2:
        return None
    logits = logits.contiguous()
    rows, vocab = logits.shape
    argmax = torch.empty(rows, dtype=torch.int64)
    lse = torch.empty(rows, dtype=torch.float32)
    lib.hydra_logits_stats(logits.data_ptr(), rows, vocab, argmax.data_ptr(), lse.data_ptr())
    return argmax, lse
