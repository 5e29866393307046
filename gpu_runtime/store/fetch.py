"""Parallel fetch of a stage layout into a buffer.

The layout's ranges are cut into chunks of at most ``chunk_bytes``; ``num_connections`` threads
take chunks in buffer order, so the contiguous prefix (what readers can use) grows from the
front while several requests are in flight. Progress is reported per piece as
``on_progress(chunk_index, nbytes)``; chunk ``i`` fills ``chunks[i]`` front to back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gpu_runtime.store.link import FetchStats, NodeLink
from gpu_runtime.store.ranges import StageLayout
from gpu_runtime.store.readers import RangeReader, RetryPolicy


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Parallelism and retry policy of one fetch."""

    num_connections: int = 4
    chunk_bytes: int = 4 * 1024 * 1024
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if not 1 <= self.num_connections <= 64:
            raise ValueError(f"num_connections must be in 1..64, got {self.num_connections}")
        if self.chunk_bytes < 64 * 1024:
            raise ValueError(f"chunk_bytes must be >= 64 KiB, got {self.chunk_bytes}")


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes ``[start, end)`` of ``file`` landing at ``buffer_offset``."""

    file: str
    start: int
    end: int
    buffer_offset: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class _SharedState:
    next: int = 0
    error: Exception | None = None


class FetchCancelled(Exception):
    """Raised inside reader threads when another chunk failed or the fetch was cancelled."""


def split_chunks(layout: StageLayout, chunk_bytes: int) -> list[Chunk]:
    """The layout's ranges cut into chunks of at most ``chunk_bytes``, in buffer order."""
    chunks = []
    for r in sorted(layout.ranges, key=lambda r: r.buffer_offset):
        for start in range(r.start, r.end, chunk_bytes):
            end = min(start + chunk_bytes, r.end)
            chunks.append(Chunk(r.file, start, end, r.buffer_offset + start - r.start))
    return chunks


def fetch_chunks(reader: RangeReader, chunks: list[Chunk], dest: memoryview, *,
                 config: FetchConfig, link: NodeLink | None = None,
                 on_progress: Callable[[int, int], None] = lambda i, n: None,
                 cancel: threading.Event | None = None, background: bool = False) -> FetchStats:
    """Downloads every chunk into ``dest`` (indexed by buffer offset) with parallel connections;
    ``background``: yields the link to foreground fetches (``NodeLink.background_throttle``).

    Raises the first error any connection hit (after its retries); the other connections stop
    at their next piece. Returns the bytes moved, the wall time and the request counters.
    """
    stop = cancel or threading.Event()
    state = _SharedState()
    lock = threading.Lock()
    throttle = (lambda n: None) if link is None else (
        link.background_throttle if background else link.throttle)
    requests_before, retries_before = reader.counters.requests, reader.counters.retries

    def worker() -> None:
        while not stop.is_set():
            with lock:
                i = state.next
                state.next += 1
            if i >= len(chunks):
                return
            c = chunks[i]

            def progress(n: int, i: int = i) -> None:
                if stop.is_set():
                    raise FetchCancelled(f"fetch stopped at chunk {i}")
                on_progress(i, n)
            try:
                reader.read_into(c.file, c.start, dest[c.buffer_offset:c.buffer_offset + c.length],
                                 throttle, progress)
            except FetchCancelled:
                return
            except Exception as exc:  # noqa: BLE001 - handed to the caller, re-raised below
                with lock:
                    state.error = state.error or exc
                stop.set()
                return

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"fetch-{k}", daemon=True)
               for k in range(min(config.num_connections, len(chunks)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if state.error is not None:
        raise state.error
    if cancel is not None and cancel.is_set():
        raise FetchCancelled("fetch cancelled")
    return FetchStats(
        bytes=sum(c.length for c in chunks), seconds=time.perf_counter() - started,
        num_requests=reader.counters.requests - requests_before,
        num_retries=reader.counters.retries - retries_before, num_connections=len(threads))
