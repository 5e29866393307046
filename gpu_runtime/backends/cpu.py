"""The CPU backend: the native kernels (``gpu_runtime.native``, ``csrc/*.c``) where each applies,
the torch backend's op for the rest, decided per call.

A kernel does not apply to a dtype other than float32 / bfloat16 / float16, an unexpected
layout, or, for the elementwise kernels, more than ``MAX_TOKENS`` rows (SiLU: other than
``SILU_TOKENS``). The elementwise kernels are single-threaded; at decode sizes one pass over a
few KB costs less than torch's several multi-threaded eager kernels (each a dispatch, an output
allocation and a wake-up of the OpenMP threads), while a prefill of hundreds of tokens is real
work that torch's kernels spread over every core. Decode attention of a large batch reads
megabytes of cache per layer: it splits the batch in two over torch's own OpenMP threads
(``native``), up to ``torch.get_num_threads()``.

Each ``native_*`` method is the ctypes call of one kernel: it returns None (or False) when the
kernel does not apply, and the op of the same name falls back to ``TorchBackend``'s.

Rounding: the kernels compute in float32 and round to the tensor's dtype where the reference
(HF's eager modules) rounds, so results match it bit for bit except where a float32 sum or
``exp`` is evaluated in a different order (last-bit differences, see the kernel comments).
"""

from __future__ import annotations

import ctypes
import math
from typing import TYPE_CHECKING

import torch

from gpu_runtime.backends.base import block_error, context_error, slot_error
from gpu_runtime.backends.torch_backend import TorchBackend

if TYPE_CHECKING:
    from gpu_runtime.attention import AttentionMetadata

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Row limits of the elementwise kernels; beyond them torch's kernels, which use every core,
# win. Measured on the 2-core bench machine with hidden 1024 / intermediate 2816: RMSNorm and
# RoPE are still ~2x faster natively at 32 rows, SiLU breaks even near 12. A single row's SiLU
# is as fast in torch's two small kernels (A/B within one process, bf16 batch 1: the native
# one cost 3% of a decode step; at batch 8 it saves 5%).
MAX_TOKENS = 32
SILU_TOKENS = range(2, 9)
# Threads decode attention may use (it splits a large batch in two, PAIR_MIN_WORK in
# csrc/attention.c); None: as many as torch's intra-op threads, so a worker given one core
# keeps to one.
ATTENTION_THREADS: int | None = None
# return codes of the kernels (csrc/kernels.h)
OK, BAD_SHAPE, NO_MEMORY, BAD_CONTEXT, BAD_SLOT, BAD_BLOCK = 0, -1, -2, -3, -4, -5


def _is_rows(*tensors: torch.Tensor) -> bool:
    """(tokens, heads, hd) views whose heads are contiguous within a token (rows may be
    further apart, e.g. q and k sliced from one fused tensor)."""
    return all(t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]
               for t in tensors)


def _is_native(t: torch.Tensor) -> bool:
    """A CPU tensor of a dtype the kernels know."""
    return t.is_cpu and t.dtype in DTYPE_CODES


class CpuBackend(TorchBackend):
    """``TorchBackend("cpu")`` with the native kernels in front of its ops."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        super().__init__("cpu")
        self.name = "cpu:native"
        self.lib = lib

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.native_rms_norm(x, weight, eps, delta)
        return super().rms_norm(x, weight, eps, delta) if out is None else out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        out = self.native_silu_mul(gate, up)
        return super().silu_mul(gate, up) if out is None else out

    def rope_qk(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (q, k) if self.native_rope_qk(q, k, cos, sin) else super().rope_qk(q, k, cos, sin)

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.context_lens_tensor is None:
            meta.context_lens_tensor = torch.tensor(meta.context_lens, dtype=torch.int64)
        out = self.native_decode_attention(q, k, v, kv_cache, meta.slot_mapping,
                                           meta.block_tables, meta.context_lens_tensor)
        return super().decode_attention(q, k, v, kv_cache, meta) if out is None else out

    def logits_stats(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.native_logits_stats(logits)
        return super().logits_stats(logits) if out is None else out

    def native_decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                block_tables: torch.Tensor,
                                context_lens: torch.Tensor) -> torch.Tensor | None:
        """``decode_attention`` without the metadata: q (seqs, heads, hd), k/v (seqs,
        kv_heads, hd), kv_cache (2, num_blocks, block_size, kv_heads, hd), slot_mapping
        (seqs,), block_tables (seqs, width) and context_lens (seqs,) int64 -> (seqs, heads *
        hd); None when the kernel does not apply. The kernel checks every slot, used block and
        context length against the cache before it writes; a bad one raises here."""
        if not _is_native(q) or not _is_rows(q, k, v) or not kv_cache.is_contiguous():
            return None
        if kv_cache.dtype != q.dtype or not all(t.dtype == torch.int64 and t.is_contiguous()
                                                for t in (slot_mapping, block_tables,
                                                          context_lens)):
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
        error_at = ctypes.c_int64(-1)
        rc = self.lib.hydra_decode_attention(
            q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
            kv_cache.data_ptr(), num_blocks, block_size, slot_mapping.data_ptr(),
            block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(), seqs,
            heads, kv_heads, hd, DTYPE_CODES[q.dtype], 1.0 / math.sqrt(hd), out.data_ptr(),
            ATTENTION_THREADS or torch.get_num_threads(), ctypes.byref(error_at))
        if rc != OK:
            raise _attention_error(rc, error_at.value, kv_cache, slot_mapping, block_tables,
                                   context_lens)
        return out

    def native_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                        delta: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``rms_norm`` by the kernel, or None when it does not apply."""
        if not _is_native(x) or x.dim() != 2 or x.shape[0] > MAX_TOKENS or not x.is_contiguous():
            return None
        if weight.dtype != x.dtype or not weight.is_contiguous():
            return None
        if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype
                                  or not delta.is_contiguous()):
            return None
        out = torch.empty_like(x)
        total = x if delta is None else torch.empty_like(x)
        rc = self.lib.hydra_rms_norm(x.data_ptr(), None if delta is None else delta.data_ptr(),
                                     weight.data_ptr(), total.data_ptr(), out.data_ptr(),
                                     x.shape[0], x.shape[1], eps, DTYPE_CODES[x.dtype])
        if rc != OK:
            raise MemoryError(f"rms_norm: no memory for a row of {x.shape[1]} floats")
        return total, out

    def native_silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
        """``silu_mul`` by the kernel, or None when it does not apply."""
        if not _is_native(gate) or gate.dim() != 2 or gate.shape[0] not in SILU_TOKENS:
            return None
        if up.shape != gate.shape or up.dtype != gate.dtype or not (gate.is_contiguous()
                                                                    and up.is_contiguous()):
            return None
        out = torch.empty_like(gate)
        self.lib.hydra_silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(),
                                DTYPE_CODES[gate.dtype])
        return out

    def native_rope_qk(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> bool:
        """``rope_qk`` in place by the kernel; False (nothing changed) when it does not
        apply."""
        if not _is_native(q) or q.shape[0] > MAX_TOKENS or not _is_rows(q, k):
            return False
        if not all(t.dtype == q.dtype for t in (k, cos, sin)) or not (cos.is_contiguous()
                                                                      and sin.is_contiguous()):
            return False
        tokens, heads, hd = q.shape
        rc = self.lib.hydra_rope_qk(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0),
                                    cos.data_ptr(), sin.data_ptr(), tokens, heads, k.shape[1],
                                    hd, DTYPE_CODES[q.dtype])
        return rc == OK

    def native_logits_stats(self, logits: torch.Tensor,
                            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``logits_stats`` by the kernel, or None when it does not apply."""
        if not logits.is_cpu or logits.dtype != torch.float32 or logits.dim() != 2:
            return None
        logits = logits.contiguous()
        rows, vocab = logits.shape
        argmax = torch.empty(rows, dtype=torch.int64)
        lse = torch.empty(rows, dtype=torch.float32)
        self.lib.hydra_logits_stats(logits.data_ptr(), rows, vocab, argmax.data_ptr(),
                                    lse.data_ptr())
        return argmax, lse


def _attention_error(rc: int, error_at: int, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor) -> Exception:
    """What a nonzero return of ``hydra_decode_attention`` raises; ``error_at`` is the entry
    the kernel rejected (flat, in the block tables)."""
    _, num_blocks, block_size, kv_heads, hd = kv_cache.shape
    width = block_tables.shape[1]
    if rc == BAD_CONTEXT:
        return context_error(error_at, int(context_lens[error_at]), width, block_size)
    if rc == BAD_BLOCK:
        seq, column = divmod(error_at, width)
        return block_error(seq, column, int(block_tables[seq, column]), num_blocks)
    if rc == BAD_SLOT:
        return slot_error(error_at, int(slot_mapping[error_at]), num_blocks, block_size)
    if rc == NO_MEMORY:
        return MemoryError("decode attention: no memory for its scratch buffers")
    return ValueError(f"decode attention rejected its shape: kv_heads {kv_heads}, head_dim "
                      f"{hd} (at most 512, and heads a multiple of kv_heads)")
