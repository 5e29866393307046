"""Block manager: random allocate / append / free programs keep the block accounting exact."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runtime.block_manager import BlockManager

OPS = st.lists(st.tuples(st.sampled_from(["alloc", "append", "free"]),
                         st.integers(0, 5), st.integers(1, 70)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 4, 16]), ops=OPS)
def test_random_programs_keep_blocks_exclusive(num_blocks, block_size, ops):
    bm = BlockManager(num_blocks, block_size)
    lengths: dict[int, int] = {}
    for op, seq, n in ops:
        if op == "alloc" and not bm.has(seq):
            if bm.can_allocate(n):
                bm.allocate(seq, n)
                lengths[seq] = n
            else:
                assert bm.blocks_for(n) > bm.num_free_blocks
        elif op == "append" and bm.has(seq):
            new_len = lengths[seq] + n
            if bm.can_append(seq, new_len):
                bm.append(seq, new_len)
                lengths[seq] = new_len
        elif op == "free":
            bm.free(seq)
            lengths.pop(seq, None)
        owned = [b for s in lengths for b in bm.block_table(s)]
        assert len(owned) == len(set(owned)), f"a block has two owners: {sorted(owned)}"
        assert len(owned) + bm.num_free_blocks == num_blocks, (len(owned), bm.num_free_blocks)
        for s, length in lengths.items():
            assert len(bm.block_table(s)) == bm.blocks_for(length), (s, length)
    all_slots = [x for s, length in lengths.items() for x in bm.slots(s, 0, length)]
    assert len(all_slots) == len(set(all_slots)), "two tokens share a cache slot"
    assert all(0 <= x < num_blocks * block_size for x in all_slots)


def test_slots_follow_the_block_table():
    bm = BlockManager(8, 4)
    bm.allocate(0, 3)  # block 0
    bm.allocate(1, 5)  # blocks 1, 2
    bm.append(0, 6)  # block 3
    assert bm.block_table(0) == [0, 3] and bm.block_table(1) == [1, 2]
    assert bm.slots(0, 0, 6) == [0, 1, 2, 3, 12, 13]
    assert bm.slots(1, 3, 5) == [7, 8]
    bm.free(1)
    assert bm.num_free_blocks == 6
    bm.allocate(2, 4)  # lowest free id is reused first
    assert bm.block_table(2) == [1]


def test_append_within_a_block_takes_nothing():
    bm = BlockManager(2, 16)
    bm.allocate(0, 1)
    assert bm.append(0, 16) == [] and bm.num_free_blocks == 1
    assert bm.append(0, 17) == [1] and not bm.can_append(0, 33)
