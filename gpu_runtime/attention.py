"""Attention over the paged KV cache, and the per-step metadata every layer shares.

Tokens of a step are flattened to ``(num_tokens, ...)`` (vLLM's layout): linear layers run on
all of them at once. Attention writes this step's keys and values into the cache slots named by
``slot_mapping``, then reads each sequence's context back through its block table. A layer's
cache is one tensor ``(2, num_blocks, block_size, kv_heads, head_dim)``, keys then values, so
both are gathered (and converted) by one kernel each.

A layer with a sliding window (Mistral, Qwen2/3 with ``use_sliding_window``) passes its size:
each query then attends to the last ``sliding_window`` positions, its own included. The cache
still holds the whole context (block reclaim outside the window: not yet); the window is a mask,
in fresh prefill, in a chunk over a cached prefix and in decode. The native decode kernel reads
whole contexts, so a decode step whose window excludes part of some context runs the torch path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gpu_runtime import kernels


class Scratch:
    """Buffers a stage's attention reuses across layers and steps, one per name, grown on
    demand. A decode step gathers and upcasts a few MB of keys and values per layer; fresh
    tensors of that size come from mmap and page-fault on every layer (thousands of faults a
    step), reused ones do not."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """A contiguous ``shape`` tensor on ``like``'s device (of ``dtype``, default
        ``like``'s); its contents are garbage, and it is overwritten by the next ``get`` of
        ``name``."""
        dtype = dtype or like.dtype
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.device != like.device or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


@dataclass(slots=True)
class AttentionMetadata:
    """What attention needs for one step; built once per step, shared by all layers.

    positions:      (num_tokens,) position of each token in its sequence
    slot_mapping:   (num_tokens,) flat cache slot (block * block_size + offset) of each token
    block_tables:   (batch, max_blocks) physical blocks of each sequence, padded with 0
    context_lens:   (batch,) tokens in the cache after this step, per sequence
    query_lens:     (batch,) tokens of this step, per sequence
    scratch:        reusable buffers of the stage (None: allocate per layer)
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: list[int]
    query_lens: list[int]
    block_size: int
    scratch: Scratch | None = None
    # derived in __post_init__: attention mask and the padded-query gather/scatter indices
    attn_mask: torch.Tensor | None = None
    has_mask: bool = False  # _build_mask ran (attn_mask stays None where none is needed)
    query_index: torch.Tensor | None = None  # (batch * max_q,) flat token of each padded query
    output_index: torch.Tensor | None = None  # (num_tokens,) padded-query row of each token
    max_context: int = 0
    is_fresh_prefill: bool = False  # every sequence's context is exactly this step's tokens
    first_block: int | None = None  # one sequence on consecutive blocks: read them as a view
    kv_index: torch.Tensor | None = None  # (2 * batch * blocks,) key then value rows, lazily
    context_lens_tensor: torch.Tensor | None = None  # (batch,) int64, lazily (native kernel)
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # by window, lazily

    def __post_init__(self) -> None:
        assert len(self.context_lens) == len(self.query_lens) == self.block_tables.shape[0], (
            f"batch mismatch: {len(self.context_lens)} context lens, {len(self.query_lens)} "
            f"query lens, block table {tuple(self.block_tables.shape)}")
        self.max_context = max(self.context_lens)
        # prefill of new (or recomputed) sequences attends to this step's own keys and values:
        # no cache read, no mask (is_causal), no padding
        self.is_fresh_prefill = (not self.is_decode and self.context_lens == self.query_lens)
        if self.attn_mask is None and not self.is_fresh_prefill and not self.is_decode:
            self._build_mask()  # decode builds it only if the torch path runs (ensure_mask)
        if self.batch_size == 1 and not self.is_fresh_prefill:
            # the block manager hands out lowest ids first, so a lone sequence's blocks are
            # usually consecutive; then its context is a slice of the cache, no gather needed
            used = self.block_tables[0, :-(-self.max_context // self.block_size)].tolist()
            if used == list(range(used[0], used[0] + len(used))):
                self.first_block = used[0]

    @property
    def batch_size(self) -> int:
        return len(self.context_lens)

    @property
    def is_decode(self) -> bool:
        return max(self.query_lens) == 1

    def ensure_mask(self) -> None:
        """The mask and padded-query indices of the torch cached-attention path, built on first
        use: a decode step on the native kernel never needs them."""
        if not self.has_mask and self.attn_mask is None and not self.is_fresh_prefill:
            self._build_mask()

    def is_windowed(self, sliding_window: int | None) -> bool:
        """Whether a window of ``sliding_window`` positions hides part of some context."""
        return sliding_window is not None and self.max_context > sliding_window

    def mask_for(self, sliding_window: int | None) -> torch.Tensor | None:
        """The torch cached-attention path's mask (batch, 1, max_q, max_context), limited to
        the last ``sliding_window`` positions of each query where that hides any key."""
        self.ensure_mask()
        if sliding_window is None or self.max_context <= sliding_window:
            return self.attn_mask
        if sliding_window not in self.window_masks:
            self.window_masks[sliding_window] = self._mask(sliding_window)[0][:, None]
        return self.window_masks[sliding_window]

    def _mask(self, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask (batch, max_q, max_context): which keys each padded query row sees, valid
        query rows (batch, max_q))."""
        device = self.positions.device
        max_q = max(self.query_lens)
        ctx = torch.tensor(self.context_lens, device=device)
        qlen = torch.tensor(self.query_lens, device=device)
        # query row i of sequence b sits at absolute position ctx[b] - qlen[b] + i
        q_pos = ctx[:, None] - qlen[:, None] + torch.arange(max_q, device=device)[None, :]
        k_pos = torch.arange(self.max_context, device=device)
        mask = k_pos[None, None, :] <= q_pos[:, :, None]  # (batch, max_q, max_context)
        if sliding_window is not None:
            mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        valid_q = torch.arange(max_q, device=device)[None, :] < qlen[:, None]  # (batch, max_q)
        mask &= valid_q[:, :, None]
        mask[:, :, 0] |= ~valid_q  # padded query rows see key 0 so softmax stays finite
        return mask, valid_q

    def _build_mask(self) -> None:
        self.has_mask = True
        device = self.positions.device
        batch, max_q = self.batch_size, max(self.query_lens)
        qlen = torch.tensor(self.query_lens, device=device)
        mask, valid_q = self._mask(None)
        if batch == 1 and max_q == 1:
            self.attn_mask = None  # one decode row attends to its whole context: no mask needed
        else:
            self.attn_mask = mask[:, None]  # (batch, 1, max_q, max_context)
        if max_q > 1:
            starts = torch.cumsum(qlen, 0) - qlen
            row = torch.arange(max_q, device=device)[None, :]
            self.query_index = torch.where(valid_q, starts[:, None] + row, 0).reshape(-1)
            self.output_index = (torch.arange(batch, device=device)[:, None] * max_q + row)[valid_q]


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """kv_cache: (2, num_blocks, block_size, kv_heads, head_dim); k, v: (tokens, kv_heads, hd)."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    slots = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    slots[0].index_copy_(0, slot_mapping, k)
    slots[1].index_copy_(0, slot_mapping, v)


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


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, sliding_window: int | None = None) -> torch.Tensor:
    """q: (tokens, heads, hd); k, v: (tokens, kv_heads, hd); kv_cache: (2, num_blocks,
    block_size, kv_heads, hd) -> (tokens, heads * hd). ``sliding_window``: each query sees only
    the last that many positions (its own included); None: its whole causal context."""
    if meta.is_decode and not meta.is_windowed(sliding_window):
        out = _native_decode_attention(q, k, v, kv_cache, meta)
        if out is not None:
            return out
    write_kv(kv_cache, k, v, meta.slot_mapping)
    if meta.is_fresh_prefill:
        return _prefill_attention(q, k, v, meta.query_lens, sliding_window)
    return _cached_attention(q, kv_cache, meta, sliding_window)


def _native_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             kv_cache: torch.Tensor,
                             meta: AttentionMetadata) -> torch.Tensor | None:
    """Decode on CPU: the native kernel writes k/v and reads each context through its block
    table, no gather and no float32 copy (``gpu_runtime.kernels``); None: use torch."""
    if q.device.type != "cpu":
        return None
    if meta.context_lens_tensor is None:
        meta.context_lens_tensor = torch.tensor(meta.context_lens, dtype=torch.int64)
    return kernels.decode_attention(q, k, v, kv_cache, meta.slot_mapping, meta.block_tables,
                                    meta.context_lens_tensor)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_lens: list[int],
                       sliding_window: int | None = None) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    gqa = num_heads != k.shape[1]
    outs, start = [], 0
    for n in query_lens:  # one causal attention per sequence; prefill steps are few
        qs, ks, vs = (t[start:start + n].transpose(0, 1)[None] for t in (q, k, v))  # (1, h, n, hd)
        if sliding_window is not None and n > sliding_window:
            out = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=_window_mask(n, sliding_window, q.device), enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        outs.append(out[0].transpose(0, 1).reshape(n, num_heads * head_dim))
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _window_mask(n: int, sliding_window: int, device: torch.device) -> torch.Tensor:
    """(n, n) causal mask of one sequence where token i sees tokens (i - window, i]."""
    pos = torch.arange(n, device=device)
    offset = pos[:, None] - pos[None, :]  # (query, key): how far back each key is
    return (offset >= 0) & (offset < sliding_window)


def _cached_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                      sliding_window: int | None = None) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    mask = meta.mask_for(sliding_window)
    dtype = torch.float32 if _is_upcast(q) else q.dtype
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
    out = out.transpose(1, 2).reshape(-1, num_heads * head_dim)  # (batch * max_q, heads * hd)
    out = out.to(q.dtype)
    if meta.output_index is not None:
        out = out.index_select(0, meta.output_index)
    return out


def _is_upcast(q: torch.Tensor) -> bool:
    """Cached attention runs in float32 for bf16/fp16 on CPU: without native bf16 dot products
    (AVX2) the CPU SDPA kernel makes many tiny reduced-precision GEMM calls; converting the
    gathered keys and values once costs less (best of 200, cold caches, context ~75, bf16:
    batch 8 1.74 -> 0.97 ms per layer, batch 1 0.40 -> 0.29 ms). Softmax is float32 either
    way."""
    return q.device.type == "cpu" and q.dtype != torch.float32

