"""Planning a stage's fetch: coalesced ranges, alignment, placements that point at the right bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from store_helpers import file_bytes

from gpu_runtime.checkpoint import TensorEntry
from gpu_runtime.store.ranges import DATA_ALIGN, plan_stage


def test_contiguous_tensors_of_one_file_become_one_range(ckpt_index):
    files = sorted({t.file for t in ckpt_index.tensors})
    layout = plan_stage(ckpt_index.tensors)
    # safetensors stores tensors back to back: one range per shard
    assert [r.file for r in layout.ranges] == files
    assert layout.fetch_bytes == ckpt_index.total_bytes
    assert len(layout.placements) == len(ckpt_index.tensors)


def test_placements_point_at_the_tensor_bytes(ckpt_root, ckpt_index):
    layout = plan_stage(ckpt_index.tensors[3:17])
    buf = bytearray(layout.size)
    for r in layout.ranges:
        buf[r.buffer_offset:r.buffer_offset + r.length] = file_bytes(
            ckpt_root / "small", r.file, r.start, r.end)
    for p in layout.placements:
        e = p.entry
        assert bytes(buf[p.buffer_offset:p.buffer_end]) == file_bytes(
            ckpt_root / "small", e.file, e.offset, e.end), e.name
        assert p.buffer_offset % DATA_ALIGN == e.offset % DATA_ALIGN


def _entry(name, file, offset, length):
    return TensorEntry(name, "U8", (length,), file, offset, length)


def test_gap_merging_and_split():
    entries = [_entry("a", "f", 100, 10), _entry("b", "f", 120, 10), _entry("c", "g", 0, 5)]
    assert [(r.file, r.start, r.end) for r in plan_stage(entries).ranges] == [
        ("f", 100, 110), ("f", 120, 130), ("g", 0, 5)]
    assert [(r.file, r.start, r.end) for r in plan_stage(entries, max_gap=10).ranges] == [
        ("f", 100, 130), ("g", 0, 5)]


def test_layout_digest_is_stable_and_sensitive():
    entries = [_entry("a", "f", 0, 10), _entry("b", "f", 10, 10)]
    assert plan_stage(entries).digest() == plan_stage(list(reversed(entries))).digest()
    assert plan_stage(entries).digest() != plan_stage(entries[:1]).digest()


@st.composite
def tensor_sets(draw):
    entries, pos = [], {"f1": 0, "f2": 0}
    for i in range(draw(st.integers(1, 25))):
        file = draw(st.sampled_from(["f1", "f2"]))
        pos[file] += draw(st.integers(0, 100))  # gap before the tensor
        length = draw(st.integers(1, 300))
        entries.append(_entry(f"t{i}", file, pos[file], length))
        pos[file] += length
    return entries, draw(st.integers(0, 64))


@settings(max_examples=200, deadline=None)
@given(tensor_sets())
def test_layout_covers_every_tensor_once(case):
    entries, gap = case
    layout = plan_stage(entries, max_gap=gap)
    spans = sorted((r.buffer_offset, r.buffer_offset + r.length) for r in layout.ranges)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans  # no overlap
    assert spans[-1][1] == layout.size
    for p in layout.placements:
        r = next(r for r in layout.ranges if r.file == p.entry.file
                 and r.start <= p.entry.offset and p.entry.end <= r.end)
        assert p.buffer_offset == r.buffer_offset + p.entry.offset - r.start
    # ranges never merge across a gap larger than max_gap
    for a, b in zip(layout.ranges, layout.ranges[1:], strict=False):
        assert a.file != b.file or b.start - a.end > gap
