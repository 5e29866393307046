"""The progress mark only covers the contiguous, verified prefix."""

from __future__ import annotations

import threading
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runtime.checkpoint import TensorEntry
from gpu_runtime.prefetch.progress import ContiguousProgress, Verifier
from gpu_runtime.store.fetch import Chunk
from gpu_runtime.store.ranges import plan_stage


def chunks_of(lengths: list[int], pad: int = 0) -> list[Chunk]:
    out, offset = [], 0
    for n in lengths:
        out.append(Chunk("f", 0, n, offset))
        offset += n + pad
    return out


@st.composite
def completions(draw):
    lengths = draw(st.lists(st.integers(1, 50), min_size=1, max_size=8))
    pieces = []  # (chunk, nbytes) in fill order per chunk, interleaved arbitrarily
    for i, n in enumerate(lengths):
        cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=3, unique=True))) if n > 1 else []
        bounds = [0, *cuts, n]
        pieces.append([(i, b - a) for a, b in zip(bounds, bounds[1:], strict=False)])
    order = []
    queues = [list(p) for p in pieces]
    while any(queues):
        i = draw(st.sampled_from([k for k, q in enumerate(queues) if q]))
        order.append(queues[i].pop(0))
    return lengths, order


@settings(max_examples=300, deadline=None)
@given(completions(), st.integers(0, 7))
def test_prefix_never_passes_a_hole(case, pad):
    lengths, order = case
    chunks = chunks_of(lengths, pad)
    progress = ContiguousProgress(chunks)
    filled = [0] * len(lengths)
    seen = 0
    for i, n in order:
        progress.add(i, n)
        filled[i] += n
        k = next((j for j, f in enumerate(filled) if f < lengths[j]), len(lengths))
        expected = (chunks[k].buffer_offset + filled[k] if k < len(lengths)
                    else chunks[-1].buffer_offset + lengths[-1])
        assert progress.prefix == expected, (filled, expected)
        assert progress.prefix >= seen  # monotonic
        seen = progress.prefix
    assert progress.prefix == chunks[-1].buffer_offset + lengths[-1]


def test_completing_a_later_chunk_first_does_not_move_the_prefix():
    progress = ContiguousProgress(chunks_of([10, 10, 10]))
    progress.add(2, 10)
    progress.add(1, 10)
    assert progress.prefix == 0
    progress.add(0, 4)
    assert progress.prefix == 4
    progress.add(0, 6)
    assert progress.prefix == 30


def _entries(data: bytes, sizes: list[int], corrupt: int | None = None) -> list[TensorEntry]:
    out, offset = [], 0
    for i, n in enumerate(sizes):
        crc = zlib.crc32(data[offset:offset + n]) ^ (1 if i == corrupt else 0)
        out.append(TensorEntry(f"t{i}", "U8", (n,), "f", offset, n, crc))
        offset += n
    return out


def _run_verifier(data: bytes, entries: list[TensorEntry]):
    layout = plan_stage(entries)
    chunks = chunks_of([len(data)])
    progress = ContiguousProgress(chunks)
    marks: list[int] = []
    cancelled = threading.Event()
    v = Verifier(layout.placements, memoryview(data), progress, marks.append, cancelled.set)
    v.start()
    for _ in range(len(data) // 8):
        progress.add(0, 8)
    progress.abort()
    v.join(5)
    return v, marks, cancelled


def test_verifier_publishes_tensor_ends_after_checking():
    data = bytes(range(256)) * 4
    v, marks, cancelled = _run_verifier(data, _entries(data, [100, 300, 24, 600]))
    assert v.error is None and not cancelled.is_set()
    assert marks == [100, 400, 424, 1024]


def test_verifier_stops_at_a_corrupted_tensor_and_publishes_nothing_past_it():
    data = bytes(range(256)) * 4
    v, marks, cancelled = _run_verifier(data, _entries(data, [100, 300, 24, 600], corrupt=1))
    assert marks == [100]  # t0 verified; t1 failed; t2 and t3 never published
    assert cancelled.is_set()
    assert v.error is not None and v.error.tensor == "t1"
    assert v.error.expected == v.error.actual ^ 1
    assert "t1" in v.error.message and "crc32" in v.error.message
