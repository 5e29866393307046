"""Turning out-of-order chunk completions into a contiguous prefix, and verifying it.

``ContiguousProgress`` counts bytes per chunk (each chunk fills front to back) and exposes the
end of the longest fully received prefix: a chunk that completes before an earlier one never
moves it past the hole. ``Verifier`` follows that prefix tensor by tensor, checks each tensor's
crc32 against the index, and only then publishes the tensor's end as the buffer's progress mark,
so a reader can never see unverified bytes.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Sequence

from gpu_runtime.prefetch.errors import ChecksumError
from gpu_runtime.store.fetch import Chunk
from gpu_runtime.store.ranges import TensorPlacement


class ContiguousProgress:
    """Thread-safe received-prefix tracker over chunks laid out in buffer order."""

    def __init__(self, chunks: Sequence[Chunk]) -> None:
        self._starts = [c.buffer_offset for c in chunks]
        self._lengths = [c.length for c in chunks]
        self._fill = [0] * len(chunks)
        self._first_open = 0  # index of the first chunk not yet complete
        self._end = chunks[-1].buffer_offset + chunks[-1].length if chunks else 0
        self._cond = threading.Condition()
        self._aborted = False

    @property
    def prefix(self) -> int:
        """Buffer offset up to which every byte has been received."""
        with self._cond:
            return self._prefix()

    def _prefix(self) -> int:
        k = self._first_open
        return self._end if k == len(self._starts) else self._starts[k] + self._fill[k]

    def add(self, index: int, nbytes: int) -> None:
        """Records ``nbytes`` more bytes at the front of chunk ``index``."""
        with self._cond:
            before = self._prefix()
            self._fill[index] += nbytes
            assert self._fill[index] <= self._lengths[index], \
                f"chunk {index} got {self._fill[index]} bytes, it holds {self._lengths[index]}"
            while (self._first_open < len(self._fill)
                   and self._fill[self._first_open] == self._lengths[self._first_open]):
                self._first_open += 1
            if self._prefix() != before:
                self._cond.notify_all()

    def wait_until(self, offset: int, timeout_s: float = 0.1) -> bool:
        """Blocks until the prefix reaches ``offset``; False when aborted."""
        with self._cond:
            while self._prefix() < offset:
                if self._aborted:
                    return False
                self._cond.wait(timeout_s)
            return True

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()


class Verifier(threading.Thread):
    """Publishes the progress mark tensor by tensor, after checking each tensor's crc32."""

    def __init__(self, placements: Sequence[TensorPlacement], data: memoryview,
                 progress: ContiguousProgress, publish: Callable[[int], None],
                 on_error: Callable[[], None], verify: bool = True) -> None:
        super().__init__(name="prefetch-verify", daemon=True)
        self.placements = sorted(placements, key=lambda p: p.buffer_offset)
        self.data, self.progress, self.publish = data, progress, publish
        self.on_error, self.verify = on_error, verify
        self.error: ChecksumError | None = None
        self.verified = 0

    def run(self) -> None:
        for p in self.placements:
            if not self.progress.wait_until(p.buffer_end):
                return
            expected = p.entry.crc32
            if self.verify and expected is not None:
                actual = zlib.crc32(self.data[p.buffer_offset:p.buffer_end])
                if actual != expected:
                    self.error = ChecksumError(
                        f"tensor {p.name!r} of {p.entry.file} (bytes {p.entry.offset}.."
                        f"{p.entry.end}) has crc32 {actual:#010x}, the index recorded "
                        f"{expected:#010x}: the store served corrupted or changed bytes; "
                        "re-register the model if the checkpoint changed",
                        tensor=p.name, expected=expected, actual=actual)
                    self.on_error()
                    return
            self.verified += 1
            self.publish(p.buffer_end)
