"""The torch backend: every op in plain torch. It is the reference the other backends are
tested against, the backend of CUDA (SDPA over blocks gathered on the device) and of any other
device, and of CPU without the native library (``HYDRA_NATIVE=0``, no compiler).

Two of its choices depend on the device, and are made once, when the backend is built for a
device type: float32 linear layers on CPU go to oneDNN's inner product, and cached attention
on CPU runs bf16/fp16 in float32 (see ``TorchBackend.__init__``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gpu_runtime.backends.base import block_error, context_error, slot_error

if TYPE_CHECKING:
    from gpu_runtime.attention import AttentionMetadata


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
# matrices. oneDNN's call costs ~13 us more, which loses on small matrices: below
# ONEDNN_MIN_WEIGHT elements (~512 x 1024, where the two break even in one thread)
# ``F.linear`` stays. bf16 ``F.linear`` already runs oneDNN, and the op has no fp16 kernel
# here, so both keep ``F.linear``. None: every dtype uses ``F.linear``.
ONEDNN_LINEAR = _onednn_inner_product()
ONEDNN_MIN_WEIGHT = 1 << 19


class TorchBackend:
    """The ops in torch, for one device type (``backends.for_device`` builds one per type)."""

    def __init__(self, device_type: str) -> None:
        on_cpu = device_type == "cpu"
        self.name = f"torch:{device_type}"
        self.onednn = ONEDNN_LINEAR if on_cpu else None
        # Cached attention runs in float32 for bf16/fp16 on CPU: without native bf16 dot
        # products (AVX2) the CPU SDPA kernel makes many tiny reduced-precision GEMM calls;
        # converting the gathered keys and values once costs less (best of 200, cold caches,
        # context ~75, bf16: batch 8 1.74 -> 0.97 ms per layer, batch 1 0.40 -> 0.29 ms).
        # Softmax is float32 either way. On CUDA attention stays in the model dtype.
        self.upcasts_attention = on_cpu

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def linear(self, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        if (self.onednn is not None and x.dtype == torch.float32
                and weight.numel() >= ONEDNN_MIN_WEIGHT):
            return self.onednn(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        total = x if delta is None else x + delta
        # statistics in float32 as the reference does, then back to the input dtype, then the
        # weight; one fused kernel when the input already is float32
        if total.dtype == torch.float32:
            return total, F.rms_norm(total, weight.shape, weight, eps)
        normed = F.rms_norm(total.float(), weight.shape, eps=eps).to(total.dtype)
        return total, weight * normed

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    def rope_qk(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one concatenation costs less than running the elementwise kernels twice
        heads = q.shape[1]
        qk = torch.cat((q, k), dim=1)  # (tokens, heads + kv_heads, hd)
        half = qk.shape[-1] // 2
        rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)  # rotate_half
        qk = torch.addcmul(qk * cos, rotated, sin)
        return qk[:, :heads], qk[:, heads:]

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
        check_indices(meta, num_blocks, block_size)
        slots = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
        slots[0].index_copy_(0, meta.slot_mapping, k)
        slots[1].index_copy_(0, meta.slot_mapping, v)

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.write_kv(kv_cache, k, v, meta)
        return self.cached_attention(q, kv_cache, meta)

    def prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          meta: AttentionMetadata,
                          sliding_window: int | None = None) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        gqa = num_heads != k.shape[1]
        outs, start = [], 0
        for n in meta.query_lens:  # one causal attention per sequence; prefill steps are few
            qs, ks, vs = (t[start:start + n].transpose(0, 1)[None] for t in (q, k, v))
            # (1, heads, n, hd)
            if sliding_window is not None and n > sliding_window:
                mask = _window_mask(n, sliding_window, q.device)
                out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            outs.append(out[0].transpose(0, 1).reshape(n, num_heads * head_dim))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def cached_attention(self, q: torch.Tensor, kv_cache: torch.Tensor,
                         meta: AttentionMetadata,
                         sliding_window: int | None = None) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        mask = meta.mask_for(sliding_window)
        dtype = torch.float32 if self.upcasts_attention else q.dtype
        keys, values = gather_context(kv_cache, meta, dtype)
        gqa = num_heads != keys.shape[1]
        if meta.query_index is None:  # one query row per sequence (decode)
            queries = q.view(meta.batch_size, 1, num_heads, head_dim).transpose(1, 2)
        else:
            max_q = max(meta.query_lens)
            queries = q.index_select(0, meta.query_index)  # (batch * max_q, heads, hd)
            queries = queries.view(meta.batch_size, max_q, num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(queries.to(dtype), keys, values, attn_mask=mask,
                                             enable_gqa=gqa)  # (batch, heads, max_q, hd)
        out = out.transpose(1, 2).reshape(-1, num_heads * head_dim)  # (batch * max_q, h * hd)
        out = out.to(q.dtype)
        if meta.output_index is not None:
            out = out.index_select(0, meta.output_index)
        return out

    def logits_stats(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.argmax(dim=-1), torch.logsumexp(logits, dim=-1)


def check_indices(meta: AttentionMetadata, num_blocks: int, block_size: int) -> None:
    """Raises (``backends.base``) unless every context length fits its block table, every slot
    of the step is in the cache and every block-table entry the gather reads is one of the
    cache's ``num_blocks``: the first ceil(max_context / block_size) of each row, so a shorter
    sequence's padding too (0 from the block manager; the native kernel reads, and checks, only
    the entries each sequence uses). Once per step and cache shape (the first layer's write;
    the result is kept on ``meta``): two min/max reductions and one read-back, a few
    microseconds on CPU (on CUDA the read-back waits for the device: one sync per step, before
    the sampler's)."""
    if meta.checked_cache == (num_blocks, block_size):
        return
    check_step_indices(meta.slot_mapping, meta.block_tables, meta.context_lens, num_blocks,
                       block_size)
    meta.checked_cache = (num_blocks, block_size)


def check_step_indices(slots: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: list[int], num_blocks: int, block_size: int) -> None:
    """``check_indices`` on a step's index tensors wherever they are (a CUDA step checks its
    host copies before they are sent: no device sync)."""
    width = block_tables.shape[1]
    max_context = max(context_lens)
    if min(context_lens) < 1 or max_context > width * block_size:
        seq, n = next((i, n) for i, n in enumerate(context_lens)
                      if not 1 <= n <= width * block_size)
        raise context_error(seq, n, width, block_size)
    num_slots = num_blocks * block_size
    tables = block_tables[:, :-(-max_context // block_size)]  # what the gather reads
    lo_slot, hi_slot = torch.aminmax(slots)
    lo_block, hi_block = torch.aminmax(tables)
    bounds = torch.stack((lo_slot, hi_slot, lo_block, hi_block)).tolist()
    if bounds[0] < 0 or bounds[1] >= num_slots:
        index = int(((slots < 0) | (slots >= num_slots)).nonzero()[0, 0])
        raise slot_error(index, int(slots[index]), num_blocks, block_size)
    if bounds[2] < 0 or bounds[3] >= num_blocks:
        seq, column = ((tables < 0) | (tables >= num_blocks)).nonzero()[0].tolist()
        raise block_error(seq, column, int(tables[seq, column]), num_blocks)


def gather_context(kv_cache: torch.Tensor, meta: AttentionMetadata,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, num_blocks, block_size, kv_heads, hd) -> keys, values (batch, kv_heads,
    max_context, hd) in ``dtype``: views of the cache, or of ``meta.scratch`` buffers valid
    until the next layer."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    num_blocks_needed = -(-meta.max_context // block_size)
    batch = meta.batch_size
    if meta.first_block is not None:
        ctx = kv_cache.narrow(1, meta.first_block, num_blocks_needed)  # a view, no copy
    else:
        if meta.kv_index is None:  # rows of the (2 * num_blocks, ...) view: keys, then values
            index = meta.block_tables[:, :num_blocks_needed].reshape(-1)  # (batch * blocks,)
            meta.kv_index = torch.cat((index, index + num_blocks))
        flat = kv_cache.view(2 * num_blocks, block_size, kv_heads, head_dim)
        out = _scratch(meta, "kv", (meta.kv_index.numel(), block_size, kv_heads, head_dim),
                       kv_cache.dtype, kv_cache)
        # index_select over whole blocks is a row memcpy; advanced indexing is much slower
        ctx = torch.index_select(flat, 0, meta.kv_index, out=out)  # (2 * batch * blocks, ...)
    if dtype != ctx.dtype:
        # one straight copy of whole blocks; SDPA takes the strided view below as it is
        ctx = _scratch(meta, "kv32", tuple(ctx.shape), dtype, ctx).copy_(ctx)
    ctx = ctx.reshape(2, batch, -1, kv_heads, head_dim)[:, :, :meta.max_context]
    ctx = ctx.transpose(2, 3)  # (2, batch, kv_heads, max_context, hd)
    return ctx[0], ctx[1]


def _scratch(meta: AttentionMetadata, name: str, shape: tuple[int, ...], dtype: torch.dtype,
             like: torch.Tensor) -> torch.Tensor:
    if meta.scratch is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    return meta.scratch.get(name, shape, like, dtype)


def _window_mask(n: int, sliding_window: int, device: torch.device) -> torch.Tensor:
    """(n, n) causal mask of one sequence where token i sees tokens (i - window, i]."""
    pos = torch.arange(n, device=device)
    offset = pos[:, None] - pos[None, :]  # (query, key): how far back each key is
    return (offset >= 0) & (offset < sliding_window)
