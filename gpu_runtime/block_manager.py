"""Fixed-size KV blocks: which physical blocks each sequence owns (its block table).

Pure bookkeeping, no tensors: the engine asks it for room before every step, and every pipeline
stage indexes its own KV tensors with the same block tables, so blocks are also the unit KV
export and import move between processes (KV migration during consolidation moves whole
blocks, ``gpu_runtime.consolidate``). ``epochs`` counts how often each block was taken: a
block copied elsewhere while it held epoch e still holds the same bytes while its epoch is e
and it is full (full blocks are never written again).

Blocks are reference-counted so that the ``n`` sequences of one request share their prompt's
blocks (``fork``). A shared block is never written: before a sequence writes into one (the last,
partly filled prompt block, on its first decode step) ``append`` gives it a private copy and
records ``(src, dst)`` in ``pending_copies``; the engine sends those with the step, and every
stage copies the block in its own KV cache before the forward (copy-on-write, as vLLM does).
Copy-on-write rather than recomputing the partial block keeps "the prompt is prefilled once"
exact, at the price of one block copy per extra sequence and stage.
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
        self._refs = [0] * num_blocks  # how many block tables hold each block
        self.epochs = [0] * num_blocks  # bumped each time a block is taken
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) for the next step

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Blocks for a new sequence of ``num_tokens`` tokens; returns its block table."""
        assert seq_id not in self._tables, f"sequence {seq_id} already has blocks"
        needed = self.blocks_for(num_tokens)
        assert needed <= len(self._free), f"need {needed} blocks, {len(self._free)} free"
        self._tables[seq_id] = [self._take() for _ in range(needed)]
        return self._tables[seq_id]

    def fork(self, parent_id: int, child_id: int) -> list[int]:
        """Gives ``child_id`` the parent's blocks, shared (no block is taken)."""
        assert child_id not in self._tables, f"sequence {child_id} already has blocks"
        table = list(self._tables[parent_id])
        for block in table:
            self._refs[block] += 1
        self._tables[child_id] = table
        return table

    def _needs_copy(self, table: list[int], num_tokens: int) -> bool:
        """Whether the block that position ``num_tokens - 1`` (the one a decode step writes)
        falls in is already in the table and shared."""
        index = (num_tokens - 1) // self.block_size
        return index < len(table) and self._refs[table[index]] > 1

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Whether the sequence can grow to ``num_tokens`` tokens (a copy-on-write included)."""
        table = self._tables[seq_id]
        extra = max(self.blocks_for(num_tokens) - len(table), 0)
        return extra + self._needs_copy(table, num_tokens) <= len(self._free)

    def append(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow the sequence's table to cover ``num_tokens`` tokens, the block that the token at
        ``num_tokens - 1`` is written to made private; returns the new blocks."""
        table = self._tables[seq_id]
        new: list[int] = []
        if self._needs_copy(table, num_tokens):
            index = (num_tokens - 1) // self.block_size
            src, dst = table[index], self._take()
            self._refs[src] -= 1  # still > 0: another table holds it
            table[index] = dst
            self.pending_copies.append((src, dst))
            new.append(dst)
        extra = self.blocks_for(num_tokens) - len(table)
        assert extra <= len(self._free), f"seq {seq_id} needs {extra} blocks, {len(self._free)} free"
        grown = [self._take() for _ in range(max(extra, 0))]
        table.extend(grown)
        return new + grown

    def take_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write copies recorded since the last call, for the next step."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def free(self, seq_id: int) -> None:
        """Drops the sequence's table; a block goes back once no table holds it."""
        for block in self._tables.pop(seq_id, []):
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f"block {block} freed more often than held"
            if self._refs[block] == 0:
                heapq.heappush(self._free, block)

    def _take(self) -> int:
        block = heapq.heappop(self._free)
        self._refs[block] = 1
        self.epochs[block] += 1
        return block

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Flat cache slots (block * block_size + offset) of token positions [start, end)."""
        table, bs = self._tables[seq_id], self.block_size
        assert end <= len(table) * bs, f"positions up to {end} but {len(table)} blocks of {bs}"
        return [table[p // bs] * bs + p % bs for p in range(start, end)]
