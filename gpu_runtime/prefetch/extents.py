"""First-fit extent allocation over one pool, with coalescing of freed neighbours (pure)."""

from __future__ import annotations

import bisect


class ExtentAllocator:
    """Hands out ``[offset, offset + nbytes)`` extents of a ``size``-byte pool.

    The free list is sorted by offset and never holds two touching extents, so freeing
    everything gives back one extent of the whole pool. Not thread-safe: the pool locks.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"pool size must be > 0 bytes, got {size}")
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]

    def allocate(self, nbytes: int) -> int | None:
        """Offset of the first free extent that fits ``nbytes``, or None."""
        assert nbytes > 0, f"extent size must be > 0, got {nbytes}"
        for i, (offset, length) in enumerate(self._free):
            if length >= nbytes:
                if length == nbytes:
                    del self._free[i]
                else:
                    self._free[i] = (offset + nbytes, length - nbytes)
                return offset
        return None

    def free(self, offset: int, nbytes: int) -> None:
        """Returns an allocated extent, merging it with free neighbours."""
        i = bisect.bisect_left(self._free, (offset, 0))
        nxt = self._free[i] if i < len(self._free) else None
        prev = self._free[i - 1] if i > 0 else None
        assert offset >= 0 and offset + nbytes <= self.size, \
            f"extent {offset}+{nbytes} is outside the {self.size}-byte pool"
        assert nxt is None or nxt[0] >= offset + nbytes, \
            f"double free: extent {offset}+{nbytes} overlaps free {nxt}"
        assert prev is None or prev[0] + prev[1] <= offset, \
            f"double free: extent {offset}+{nbytes} overlaps free {prev}"
        start, length = offset, nbytes
        if nxt is not None and nxt[0] == offset + nbytes:
            length += nxt[1]
            del self._free[i]
        if prev is not None and prev[0] + prev[1] == offset:
            start, length = prev[0], prev[1] + length
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (start, length))

    @property
    def free_extents(self) -> list[tuple[int, int]]:
        return list(self._free)

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)

    def largest_with(self, extents: list[tuple[int, int]]) -> int:
        """The largest free extent there would be if ``extents`` (allocated ones) were freed
        too, without freeing them."""
        spans = sorted(self._free + list(extents))
        best, start, end = 0, None, None
        for offset, length in spans:
            if end is not None and offset <= end:
                end = max(end, offset + length)
            else:
                if start is not None and end is not None:
                    best = max(best, end - start)
                start, end = offset, offset + length
        if start is not None and end is not None:
            best = max(best, end - start)
        return best
