"""The pool's extent allocator: no overlap, coalescing, full recovery after frees."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runtime.prefetch.extents import ExtentAllocator

SIZE = 64


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 20), st.integers(0, 1000)),
                max_size=60))
def test_random_allocations_and_frees(ops):
    alloc = ExtentAllocator(SIZE)
    live: dict[int, int] = {}
    for is_alloc, nbytes, pick in ops:
        if is_alloc or not live:
            offset = alloc.allocate(nbytes)
            if offset is None:
                assert alloc.largest_free < nbytes  # refused only when nothing fits
                continue
            live[offset] = nbytes
        else:
            offset = sorted(live)[pick % len(live)]
            alloc.free(offset, live.pop(offset))
        spans = sorted([*live.items(), *alloc.free_extents])
        # live and free extents tile the pool exactly: no overlap, no leak
        assert sum(n for _, n in spans) == SIZE
        assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:], strict=False))
        free = alloc.free_extents
        assert all(a + n < b for (a, n), (b, _) in zip(free, free[1:], strict=False))  # merged
    for offset, nbytes in list(live.items()):
        alloc.free(offset, nbytes)
    assert alloc.free_extents == [(0, SIZE)]


def test_first_fit_and_double_free_is_caught():
    alloc = ExtentAllocator(10)
    assert [alloc.allocate(3), alloc.allocate(3), alloc.allocate(3)] == [0, 3, 6]
    alloc.free(3, 3)
    assert alloc.allocate(4) is None and alloc.largest_free == 3
    assert alloc.allocate(2) == 3  # first fit: the hole, not the tail
    alloc.free(3, 2)
    with pytest.raises(AssertionError, match="double free"):
        alloc.free(3, 2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 8), min_size=1, max_size=12), st.data())
def test_room_after_freeing_is_what_freeing_gives(sizes, data):
    """``largest_with`` predicts the largest free extent after freeing some live extents, and
    changes nothing."""
    alloc = ExtentAllocator(SIZE)
    live = [(off, n) for n in sizes if (off := alloc.allocate(n)) is not None]
    chosen = data.draw(st.lists(st.sampled_from(live), unique=True)) if live else []
    before = alloc.free_extents
    predicted = alloc.largest_with(chosen)
    assert alloc.free_extents == before
    for offset, nbytes in chosen:
        alloc.free(offset, nbytes)
    assert predicted == alloc.largest_free
