"""Byte ranges of a pipeline stage, planned from the tensor index.

A stage's weights are a set of tensors spread over stock safetensors files. ``plan_stage`` sorts
them by (file, offset), merges neighbours into one range per contiguous run (optionally across
small gaps), and lays the ranges out back to back in one buffer. Each range starts at a buffer
offset congruent to its file offset modulo ``DATA_ALIGN``, so every tensor keeps the alignment it
has in the file (safetensors data starts 8-aligned) and can be viewed in place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from gpu_runtime.checkpoint import TensorEntry

DATA_ALIGN = 64


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``[start, end)`` of ``file``, stored at ``buffer_offset`` in the stage buffer."""

    file: str
    start: int
    end: int
    buffer_offset: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"byte range of {self.file} must satisfy 0 <= start < end, "
                             f"got start={self.start} end={self.end}")

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class TensorPlacement:
    """Where one tensor of the index lives inside the stage buffer."""

    entry: TensorEntry
    buffer_offset: int

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def buffer_end(self) -> int:
        return self.buffer_offset + self.entry.length


@dataclass(frozen=True, slots=True)
class StageLayout:
    """The fetch plan of one stage: ranges to download and where each tensor lands."""

    ranges: tuple[ByteRange, ...]
    placements: tuple[TensorPlacement, ...]
    size: int  # bytes of the buffer, padding included

    @property
    def fetch_bytes(self) -> int:
        return sum(r.length for r in self.ranges)

    def digest(self) -> str:
        """A short hash of the ranges and placements; two equal layouts have equal digests."""
        h = hashlib.sha256()
        for r in self.ranges:
            h.update(f"R{r.file}\0{r.start}\0{r.end}\0{r.buffer_offset}\n".encode())
        for p in self.placements:
            e = p.entry
            h.update(f"T{e.name}\0{e.dtype}\0{e.shape}\0{e.file}\0{e.offset}\0{e.length}\0"
                     f"{p.buffer_offset}\n".encode())
        return h.hexdigest()[:32]


def plan_stage(entries: Sequence[TensorEntry], max_gap: int = 0) -> StageLayout:
    """Coalesces the byte ranges of ``entries`` and lays them out in one buffer.

    Tensors of the same file whose bytes are at most ``max_gap`` apart share one range (the gap
    bytes are downloaded too). Deterministic: the prefetcher and the loader compute the same
    layout from the same entries.
    """
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0 bytes, got {max_gap}")
    if not entries:
        raise ValueError("a stage needs at least one tensor; got an empty tensor list")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tensor names must be unique within a stage, duplicated: {dup[:5]}")
    ordered = sorted(entries, key=lambda e: (e.file, e.offset, e.name))
    # empty tensors own no bytes; they are placed at offset 0 and never wait for the network
    placements = [TensorPlacement(e, 0) for e in ordered if e.length == 0]
    ranges: list[ByteRange] = []
    cursor = 0
    for file, start, end, members in _runs([e for e in ordered if e.length > 0], max_gap):
        offset = _aligned_like(cursor, start)
        ranges.append(ByteRange(file, start, end, offset))
        placements.extend(TensorPlacement(e, offset + e.offset - start) for e in members)
        cursor = offset + end - start
    return StageLayout(tuple(ranges), tuple(placements), cursor)


def _runs(ordered: list[TensorEntry], max_gap: int) -> list[tuple[str, int, int, list]]:
    runs: list[tuple[str, int, int, list]] = []
    for e in ordered:
        if runs and runs[-1][0] == e.file and e.offset - runs[-1][2] <= max_gap:
            file, start, end, members = runs[-1]
            members.append(e)
            runs[-1] = (file, start, max(end, e.end), members)
        else:
            runs.append((e.file, e.offset, e.end, [e]))
    return runs


def _aligned_like(cursor: int, file_offset: int) -> int:
    """The smallest offset >= cursor with the same remainder modulo DATA_ALIGN as file_offset."""
    want = file_offset % DATA_ALIGN
    return cursor + (want - cursor) % DATA_ALIGN
