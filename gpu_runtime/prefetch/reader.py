"""The worker side: open a cached buffer read-only from any process, wait on its progress mark,
and view tensors in place.

``open_buffer`` takes a shared OFD lock on the buffer's extent (the prefetcher will not evict a
locked extent; the kernel drops the lock if the worker dies), maps the extent read-only, and
checks the header still belongs to the handle's generation. ``iter_tensors`` yields each tensor
as soon as the mark passes its last byte, as a ``torch.Tensor`` that aliases the shared pages:
no copy, so N workers on a node share one physical copy of the weights.
"""

from __future__ import annotations

import mmap
import os
import time
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from gpu_runtime.prefetch import locks
from gpu_runtime.prefetch.errors import (
    ERROR_CODES,
    BufferGoneError,
    BufferInUseError,
    ChecksumError,
    LayoutMismatchError,
    WaitTimeoutError,
)
from gpu_runtime.prefetch.handle import TORCH_DTYPES, BufferHandle
from gpu_runtime.prefetch.header import (
    DATA_OFFSET,
    FAILED,
    FREE,
    Header,
    Snapshot,
    TornHeaderError,
)
from gpu_runtime.store.ranges import StageLayout, TensorPlacement

RECHECK_S = 0.05  # bound on one futex sleep, so a dead prefetcher is noticed


class SharedBuffer:
    """A read-only mapping of one cached buffer; keep it open while its tensors are in use."""

    def __init__(self, handle: BufferHandle, populate: bool = False) -> None:
        self.handle = handle
        try:
            self._fd = os.open(handle.pool_path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise BufferGoneError(f"pool {handle.pool_path} of buffer {handle.key} does not "
                                  "exist (node agent restarted?); prefetch again") from exc
        locks.lock_shared(self._fd, handle.extent_offset)
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        try:
            self._mm = mmap.mmap(self._fd, handle.extent_bytes, flags, mmap.PROT_READ,
                                 offset=handle.extent_offset)
        except ValueError as exc:  # a new, smaller pool replaced the one the handle names
            os.close(self._fd)
            raise BufferGoneError(f"pool {handle.pool_path} no longer holds extent "
                                  f"{handle.extent_offset}+{handle.extent_bytes} of buffer "
                                  f"{handle.key}; prefetch again") from exc
        self._header = Header(self._mm, 0)
        # tensors are made from this array, not from the mmap: torch keeps a reference to the
        # array, whose buffer export keeps the mapping from being closed under live tensors
        self._bytes = np.frombuffer(self._mm, dtype=np.uint8)
        try:  # the magic first: a stale handle may point into another buffer's data
            snap = self._header.snapshot() if self._header.magic_ok() else None
        except TornHeaderError:
            snap = None
        if snap is None or not self._is_ours(snap):
            self._release()
            raise BufferGoneError(
                f"buffer {handle.key} (generation {handle.generation}) was evicted or replaced "
                f"(extent now holds {'no live header' if snap is None else f'generation {snap.generation}, state {snap.state}'}); "
                "prefetch it again")

    def _is_ours(self, snap: Snapshot) -> bool:
        return (snap.generation == self.handle.generation and snap.state != FREE
                and snap.size == self.handle.size)

    @property
    def address(self) -> int:
        """Address of the mapped data in this process (for aliasing checks)."""
        return self._header.wake_addr - 20 + DATA_OFFSET

    def progress(self) -> Snapshot:
        return self._header.snapshot()

    def wait_for(self, offset: int, timeout_s: float | None = None) -> int:
        """Returns the mark once it is >= ``offset``; raises the fetch's typed error if the
        buffer failed (nothing more is served), ``WaitTimeoutError`` after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            seen = self._header.wake_word()
            snap = self._header.snapshot()
            if snap.state == FAILED:
                cls = ERROR_CODES.get(snap.error_code, ChecksumError)
                raise cls(f"buffer {self.handle.key} failed: {self._header.error_message()}")
            if not self._is_ours(snap):
                raise BufferGoneError(f"buffer {self.handle.key} was evicted while in use")
            if snap.mark >= offset:
                return snap.mark
            remaining = RECHECK_S if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(
                    f"buffer {self.handle.key}: progress mark {snap.mark} did not reach "
                    f"{offset} within {timeout_s} s")
            self._header.wait_change(seen, min(remaining, RECHECK_S))

    def tensor(self, placement: TensorPlacement) -> torch.Tensor:
        """A tensor viewing the placement's bytes in shared memory (no copy, read-only pages:
        writing to it crashes the process)."""
        e = placement.entry
        dtype = TORCH_DTYPES[e.dtype]
        numel = 1
        for dim in e.shape:
            numel *= dim
        if numel == 0:
            return torch.empty(e.shape, dtype=dtype)
        assert placement.buffer_end <= self.handle.size, \
            f"{e.name} ends at {placement.buffer_end}, buffer holds {self.handle.size}"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(self._bytes, dtype=dtype, count=numel,
                                    offset=DATA_OFFSET + placement.buffer_offset)
        return flat.view(e.shape)

    def close(self) -> None:
        """Unmaps and drops the lock; ``BufferInUseError`` while tensors still alias it."""
        if self._mm is None:
            return
        self._header.release_views()
        del self._bytes
        try:
            self._mm.close()
        except BufferError as exc:
            self._header = Header(self._mm, 0)
            self._bytes = np.frombuffer(self._mm, dtype=np.uint8)
            raise BufferInUseError(
                f"tensors still alias buffer {self.handle.key}; drop them (e.g. unload the "
                "stage) before closing") from exc
        self._release()

    def _release(self) -> None:
        if getattr(self, "_header", None) is not None and hasattr(self._header, "_u32"):
            self._header.release_views()
        self.__dict__.pop("_bytes", None)
        if not self._mm.closed:
            self._mm.close()
        self._mm = None  # type: ignore[assignment]
        locks.unlock(self._fd, self.handle.extent_offset)
        os.close(self._fd)

    def __enter__(self) -> SharedBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_buffer(handle: BufferHandle, populate: bool = False) -> SharedBuffer:
    """Maps a cached buffer read-only in this process and pins it against eviction.

    ``populate`` pre-maps every page (MAP_POPULATE) so the first touch of each tensor costs no
    page fault; useful once the fetch is complete.
    """
    return SharedBuffer(handle, populate)


def iter_tensors(buffer: SharedBuffer, layout: StageLayout | Sequence[TensorPlacement],
                 timeout_s: float | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(name, tensor)`` in buffer order, each as soon as the progress mark passes the
    tensor's last byte; every tensor aliases the shared buffer (zero-copy).

    ``timeout_s`` bounds the wait for each tensor. A ``StageLayout`` is checked against the
    layout the buffer was filled with (``LayoutMismatchError`` on a difference).
    """
    if isinstance(layout, StageLayout):
        if layout.digest() != buffer.handle.layout_digest:
            raise LayoutMismatchError(
                f"layout digest {layout.digest()} differs from buffer {buffer.handle.key}'s "
                f"{buffer.handle.layout_digest}; plan the stage with the same entries and "
                "max_gap as the prefetcher")
        placements: Sequence[TensorPlacement] = layout.placements
    else:
        placements = layout
    for p in sorted(placements, key=lambda p: p.buffer_end):
        if p.entry.length:
            buffer.wait_for(p.buffer_end, timeout_s)
        yield p.name, buffer.tensor(p)
