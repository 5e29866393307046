"""The interface every backend implements: the ops of a forward pass whose best kernel depends
on the device, and the errors shared by the backends' checks of cache indices.

Shapes follow vLLM's flat layout: a step's tokens are ``(num_tokens, ...)``; a layer's cache is
``(2, num_blocks, block_size, kv_heads, head_dim)``, keys then values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # attention imports the backends; the backends need its metadata type only
    from gpu_runtime.attention import AttentionMetadata


class Backend(Protocol):
    """What the layers, the attention and the sampler call; ``backends.for_device`` picks one.

    Ops take and return tensors on the backend's device and never change a caller's tensors
    except where said (the cache, RoPE's q and k)."""

    name: str

    def linear(self, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias``."""
        ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of ``x`` (rows, dim), or of ``x + delta`` when given -> (the normed input:
        ``x`` itself without delta, else the sum; normed)."""
        ...

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for (rows, dim) tensors."""
        ...

    def rope_qk(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (rotate-half) on q (tokens, heads, hd) and k (tokens, kv_heads, hd) with
        cos/sin (tokens, 1, hd). In place where the backend can: use the tensors returned."""
        ...

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """This step's k/v (tokens, kv_heads, hd) into their cache slots; raises (nothing
        written) when a slot, block or context length is outside the cache."""
        ...

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """A decode step (one query token per sequence, no window hiding any key): this
        step's k/v written first, then q (seqs, heads, hd) over each whole context ->
        (seqs, heads * hd). Raises like ``write_kv`` before writing anything."""
        ...

    def prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          meta: AttentionMetadata,
                          sliding_window: int | None = None) -> torch.Tensor:
        """Causal attention of fresh sequences over this step's own k/v (no cache read)."""
        ...

    def cached_attention(self, q: torch.Tensor, kv_cache: torch.Tensor,
                         meta: AttentionMetadata,
                         sliding_window: int | None = None) -> torch.Tensor:
        """q (tokens, heads, hd) over each sequence's context read from the cache (k/v of the
        step already written) -> (tokens, heads * hd)."""
        ...

    def logits_stats(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 logits (rows, vocab) -> (first argmax (rows,) int64, log-sum-exp (rows,)
        float32)."""
        ...


# What a bad cache index raises, on every backend; the message names the entry, its value
# and the bound. Such an index is a bookkeeping bug upstream (block manager, a pipeline peer),
# so no caller catches these: the step fails before anything is written.

def slot_error(index: int, slot: int, num_blocks: int, block_size: int) -> IndexError:
    return IndexError(
        f"slot_mapping[{index}] = {slot} is outside the KV cache's slots [0, "
        f"{num_blocks * block_size}) ({num_blocks} blocks of {block_size}); nothing written")


def block_error(seq: int, column: int, block: int, num_blocks: int) -> IndexError:
    return IndexError(
        f"block_tables[{seq}, {column}] = {block} is outside the KV cache's blocks [0, "
        f"{num_blocks}); nothing written")


def context_error(seq: int, context_len: int, width: int, block_size: int) -> ValueError:
    return ValueError(
        f"context_lens[{seq}] = {context_len} is outside [1, {width * block_size}] (a block "
        f"table {width} blocks wide, blocks of {block_size}); nothing written")
