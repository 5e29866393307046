"""Attention over the paged KV cache, and the per-step metadata every layer shares.

Tokens of a step are flattened to ``(num_tokens, ...)`` (vLLM's layout): linear layers run on
all of them at once. Attention writes this step's keys and values into the cache slots named by
``slot_mapping``, then reads each sequence's context back through its block table. A layer's
cache is one tensor ``(2, num_blocks, block_size, kv_heads, head_dim)``, keys then values, so
both are gathered (and converted) by one kernel each.

A layer with a sliding window (Mistral, Qwen2/3 with ``use_sliding_window``) passes its size:
each query then attends to the last ``sliding_window`` positions, its own included. The cache
still holds the whole context (block reclaim outside the window: not yet); the window is a mask,
in fresh prefill, in a chunk over a cached prefix and in decode. A backend's decode attention
reads whole contexts (the native kernel has no window yet), so a decode step whose window hides
part of some context runs the backend's cached attention instead.

The kernels are the device's backend's (``gpu_runtime.backends``): this module picks which of
its attention ops a step needs (decode, fresh prefill, attention over the cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gpu_runtime import backends
from gpu_runtime.devices import to_device


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
    # (num_blocks, block_size) of the cache the step's indices were checked against (the torch
    # backend checks once per step, at the first layer's write)
    checked_cache: tuple[int, int] | None = None
    # the block tables where the host can read them (the step's CPU copy), for the checks of
    # __post_init__ that read values: a device copy would cost a device-to-host read
    host_block_tables: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert len(self.context_lens) == len(self.query_lens) == self.block_tables.shape[0], (
            f"batch mismatch: {len(self.context_lens)} context lens, {len(self.query_lens)} "
            f"query lens, block table {tuple(self.block_tables.shape)}")
        self.max_context = max(self.context_lens)
        # prefill of new (or recomputed) sequences attends to this step's own keys and values:
        # no cache read, no mask (is_causal), no padding
        self.is_fresh_prefill = (not self.is_decode and self.context_lens == self.query_lens)
        if self.attn_mask is None and not self.is_fresh_prefill and not self.is_decode:
            self._build_mask()  # decode builds it only if cached attention runs (ensure_mask)
        if self.batch_size == 1 and not self.is_fresh_prefill:
            # the block manager hands out lowest ids first, so a lone sequence's blocks are
            # usually consecutive; then its context is a slice of the cache, no gather needed
            tables = self.block_tables if self.host_block_tables is None else \
                self.host_block_tables
            used = tables[0, :-(-self.max_context // self.block_size)].tolist()
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
        ctx = to_device(torch.tensor(self.context_lens), device)
        qlen = to_device(torch.tensor(self.query_lens), device)
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
        qlen = to_device(torch.tensor(self.query_lens), device)
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


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, sliding_window: int | None = None) -> torch.Tensor:
    """q: (tokens, heads, hd); k, v: (tokens, kv_heads, hd); kv_cache: (2, num_blocks,
    block_size, kv_heads, hd) -> (tokens, heads * hd). ``sliding_window``: each query sees only
    the last that many positions (its own included); None: its whole causal context. Raises
    (nothing written) when a slot, block or context length of ``meta`` is outside the cache."""
    backend = backends.for_device(q.device)
    if meta.is_decode and not meta.is_windowed(sliding_window):
        return backend.decode_attention(q, k, v, kv_cache, meta)
    backend.write_kv(kv_cache, k, v, meta)
    if meta.is_fresh_prefill:
        return backend.prefill_attention(q, k, v, meta, sliding_window)
    return backend.cached_attention(q, kv_cache, meta, sliding_window)
