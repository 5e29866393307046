"""Fixed-size KV blocks: which physical blocks each sequence owns (its block table).

Pure bookkeeping, no tensors: the engine asks it for room before every step, and every pipeline
stage indexes its own KV tensors with the same block tables, so blocks are also the unit KV
export and import move between processes (migration during consolidation: not yet).
"""

from __future__ import annotations

import heapq


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0, f"num_blocks={num_blocks} block_size={block_size}"
        self.num_blocks = num_blocks
        self.block_size = block_size
        # lowest ids first: a sequence allocated on an empty cache gets consecutive blocks
        self._free: list[int] = list(range(num_blocks))
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Blocks for a new sequence of ``num_tokens`` tokens; returns its block table."""
        assert seq_id not in self._tables, f"sequence {seq_id} already has blocks"
        needed = self.blocks_for(num_tokens)
        assert needed <= len(self._free), f"need {needed} blocks, {len(self._free)} free"
        self._tables[seq_id] = [heapq.heappop(self._free) for _ in range(needed)]
        return self._tables[seq_id]

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Whether the sequence can grow to ``num_tokens`` tokens."""
        extra = self.blocks_for(num_tokens) - len(self._tables[seq_id])
        return extra <= len(self._free)

    def append(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow the sequence's table to cover ``num_tokens`` tokens; returns the new blocks."""
        table = self._tables[seq_id]
        extra = self.blocks_for(num_tokens) - len(table)
        assert extra <= len(self._free), f"seq {seq_id} needs {extra} blocks, {len(self._free)} free"
        new = [heapq.heappop(self._free) for _ in range(max(extra, 0))]
        table.extend(new)
        return new

    def free(self, seq_id: int) -> None:
        for block in self._tables.pop(seq_id, []):
            heapq.heappush(self._free, block)

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Flat cache slots (block * block_size + offset) of token positions [start, end)."""
        table, bs = self._tables[seq_id], self.block_size
        assert end <= len(table) * bs, f"positions up to {end} but {len(table)} blocks of {bs}"
        return [table[p // bs] * bs + p % bs for p in range(start, end)]
