"""The KV tensors of one stage, in fixed-size blocks, and export/import of a sequence's KV.

Layout: ``(num_layers, 2, num_blocks, block_size, kv_heads, head_dim)``, one tensor for the
whole stage so it is allocated once (and can be allocated while weights are still arriving).
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpu_runtime.attention import Scratch
from gpu_runtime.errors import DataPlaneError, RuntimeInputError


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    layer_start: int  # global index of the first layer held
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KV cache {name}={getattr(self, name)} must be > 0")

    @property
    def bytes_per_block(self) -> int:
        return bytes_per_block(self.num_layers, self.block_size, self.num_kv_heads,
                               self.head_dim, self.dtype)


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """Bytes of one block (keys and values of ``block_size`` tokens) over ``num_layers``."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def blocks_for_budget(budget_bytes: int, stage_layers: Sequence[int], block_size: int,
                      num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      error: type[DataPlaneError] = RuntimeInputError) -> int:
    """How many blocks fit in ``budget_bytes`` on the stage with the most layers: every stage of
    a group shares one block numbering (stage 0's block table). Raises ``error`` when not one
    block fits."""
    n = budget_bytes // bytes_per_block(max(stage_layers), block_size, num_kv_heads, head_dim,
                                        dtype)
    if n < 1:
        raise error(f"kv_cache_bytes={budget_bytes} holds no block of {block_size} tokens; "
                    "raise it", "kv_cache_bytes")
    return n


def lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap]:
    """A zero tensor on fresh anonymous pages: the kernel zero-fills each page when it is first
    touched, so a cache of several GB costs nothing until blocks are written (``torch.zeros``
    writes every byte up front: seconds of a cold start on CPU). Keep the mmap alive with it."""
    elem = torch.empty((), dtype=dtype).element_size()
    pages = mmap.mmap(-1, max(math.prod(shape) * elem, 1))
    return torch.frombuffer(pages, dtype=dtype, count=math.prod(shape)).view(shape), pages


class KVCache:
    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        shape = (spec.num_layers, 2, spec.num_blocks, spec.block_size, spec.num_kv_heads,
                 spec.head_dim)
        self._pages: mmap.mmap | None = None
        if torch.device(device).type == "cpu":
            self.data, self._pages = lazily_zeroed(shape, spec.dtype)
        else:
            self.data = torch.zeros(shape, dtype=spec.dtype, device=device)
        # views made once: a step touches every layer, and view creation is not free
        self.layers = [self.data[i] for i in range(spec.num_layers)]
        self.scratch = Scratch()  # attention's gather/upcast buffers, reused every layer

    def layer(self, local_index: int) -> torch.Tensor:
        """One held layer's keys and values: (2, num_blocks, block_size, kv_heads, hd)."""
        return self.layers[local_index]

    def _local(self, layers: range) -> range:
        start, end = layers.start - self.spec.layer_start, layers.stop - self.spec.layer_start
        assert 0 <= start <= end <= self.spec.num_layers, (
            f"layers {layers} outside this stage's {self.spec.layer_start}.."
            f"{self.spec.layer_start + self.spec.num_layers}")
        return range(start, end)

    def _slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        bs = self.spec.block_size
        assert num_tokens <= len(block_table) * bs, (
            f"{num_tokens} tokens but the block table covers {len(block_table) * bs}")
        pos = torch.arange(num_tokens)
        table = torch.tensor(block_table, dtype=torch.long)
        return (table[pos // bs] * bs + pos % bs).to(self.data.device)

    def export_kv(self, block_table: list[int], num_tokens: int, layers: range) -> torch.Tensor:
        """A sequence's KV for ``layers`` (global indices) as one contiguous tensor
        (len(layers), 2, num_tokens, kv_heads, head_dim), independent of block placement."""
        local = self._local(layers)
        slots = self._slots(block_table, num_tokens)
        flat = self.data[local.start:local.stop].flatten(2, 3)  # (L, 2, blocks * bs, kvh, hd)
        return flat.index_select(2, slots).cpu()

    def import_kv(self, block_table: list[int], kv: torch.Tensor, layers: range) -> None:
        """Writes ``kv`` (from ``export_kv``) into this cache at ``block_table``'s slots."""
        local = self._local(layers)
        expected = (len(local), 2)
        assert tuple(kv.shape[:2]) == expected and kv.shape[3:] == self.data.shape[4:], (
            f"KV of shape {tuple(kv.shape)} does not fit layers {layers} of cache "
            f"{tuple(self.data.shape)}")
        slots = self._slots(block_table, kv.shape[2])
        flat = self.data[local.start:local.stop].flatten(2, 3)  # view: blocks are contiguous
        flat.index_copy_(2, slots, kv.to(self.data.device, self.data.dtype))

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write of shared blocks (``BlockManager.append``): block ``dst`` gets ``src``'s
        keys and values in every layer held. All sources are read before any destination is
        written, so the order of the pairs does not matter."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], dtype=torch.long, device=self.data.device)
        dst = torch.tensor([d for _, d in copies], dtype=torch.long, device=self.data.device)
        # (layers, 2, len(copies), block_size, kv_heads, head_dim): a gathered copy
        self.data[:, :, dst] = self.data.index_select(2, src)
