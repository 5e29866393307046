"""The node's buffer cache: entries keyed by (model, stage, layout), LRU order, eviction.

An entry is *in use* while the prefetcher fetches into it, while a caller still pins it (a
prefetch job not yet released, bounded by a TTL), or while any process holds a shared OFD lock on
its extent (a worker mapping it). Only idle, complete entries are evicted, least recently used
first, and only after taking the extent's exclusive lock, which no reader can hold at that
moment; a reader that opens a stale handle afterwards finds the header FREE or re-generated and
gets ``BufferGoneError``. Failed entries leave the index at once (a later prefetch fetches
again) and their extents are reclaimed once no reader maps them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from gpu_runtime.prefetch import locks
from gpu_runtime.prefetch.errors import CacheFullError
from gpu_runtime.prefetch.handle import BufferHandle
from gpu_runtime.prefetch.header import COMPLETE, FAILED, FETCHING, FREE, STATE_NAMES, Header
from gpu_runtime.prefetch.pool import ShmPool, extent_bytes
from gpu_runtime.store.link import FetchStats
from gpu_runtime.store.ranges import StageLayout


@dataclass(eq=False)
class Entry:
    """One cached buffer, as the prefetcher process sees it."""

    handle: BufferHandle
    layout: StageLayout
    header: Header
    state: int = FETCHING
    pins: int = 0
    last_used: float = field(default_factory=time.monotonic)
    done_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: FetchStats | None = None
    error: Exception | None = None

    @property
    def key(self) -> str:
        return self.handle.key


class BufferCache:
    """Index of the pool's buffers with pins, reader locks, LRU eviction and reclamation."""

    def __init__(self, pool: ShmPool, pin_ttl_s: float = 300.0) -> None:
        self.pool = pool
        self.pin_ttl_s = pin_ttl_s
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._doomed: list[Entry] = []
        self._lock = threading.RLock()
        self.counters = {"hits": 0, "misses": 0, "evictions": 0, "failures": 0}

    def lookup(self, key: str) -> Entry | None:
        """A live entry for ``key`` (complete or still fetching), marked most recently used."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.last_used = time.monotonic()
            return entry

    def peek(self, key: str) -> Entry | None:
        """Like ``lookup`` but leaves the LRU order alone (for planner queries)."""
        with self._lock:
            return self._entries.get(key)

    def create(self, key: str, model: str, stage: str, layout: StageLayout) -> Entry:
        """Reserves an extent for a new buffer (evicting idle entries if needed)."""
        need = extent_bytes(layout.size)
        with self._lock:
            offset = self._reserve(need, key)
            generation = self.pool.next_generation()
            handle = BufferHandle(key, model, stage, self.pool.path, offset, need, generation,
                                  layout.size, layout.digest())
            header = Header(self.pool.mm, offset)
            header.init(key, layout.size, generation)
            entry = Entry(handle, layout, header)
            self._entries[key] = entry
            return entry

    def _reserve(self, need: int, key: str) -> int:
        if need > self.pool.config.size_bytes:
            raise CacheFullError(
                f"buffer {key} needs {need} bytes but the whole pool holds "
                f"{self.pool.config.size_bytes}; raise the node's pool size (pool_bytes)",
                "pool_bytes")
        while True:
            self.reclaim()
            offset = self.pool.allocate(need)
            if offset is not None:
                return offset
            if not any(self.evict(e) for e in list(self._entries.values())):
                raise CacheFullError(
                    f"buffer {key} needs {need} bytes; the pool has {self.pool.free_bytes} "
                    f"free (largest extent {self.pool.largest_free}) and every other entry is in "
                    f"use: {[e.key for e in self._entries.values()]}; retry later or raise "
                    "pool_bytes", "pool_bytes")

    def is_pinned(self, entry: Entry, now: float | None = None) -> bool:
        if entry.pins <= 0:
            return False
        now = time.monotonic() if now is None else now
        return entry.done_at is None or now - entry.done_at < self.pin_ttl_s

    def is_in_use(self, entry: Entry) -> bool:
        """Fetching, pinned, or mapped by a reader in any process."""
        return (entry.state == FETCHING or self.is_pinned(entry)
                or locks.is_locked(self.pool.fd, entry.handle.extent_offset))

    def evict(self, entry: Entry) -> bool:
        """Frees an idle complete entry; False (and nothing changes) when it is in use."""
        with self._lock:
            if entry.state != COMPLETE or self.is_pinned(entry):
                return False
            if not self._free_extent(entry):
                return False
            self._entries.pop(entry.key, None)
            self.counters["evictions"] += 1
            return True

    def fail(self, entry: Entry, code: int, message: str, error: Exception) -> None:
        """Marks an entry FAILED in shared memory; its extent is reclaimed once unmapped."""
        with self._lock:
            entry.state, entry.error = FAILED, error
            entry.header.set_state(FAILED, code, message)
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
            self._doomed.append(entry)
            self.counters["failures"] += 1

    def reclaim(self) -> int:
        """Frees the extents of failed entries that no reader maps any more."""
        with self._lock:
            kept = [e for e in self._doomed if not (e.done.is_set() and self._free_extent(e))]
            freed = len(self._doomed) - len(kept)
            self._doomed = kept
            return freed

    def _free_extent(self, entry: Entry) -> bool:
        start = entry.handle.extent_offset
        if not locks.try_lock_exclusive(self.pool.fd, start):
            return False  # a reader maps it
        try:
            entry.header.set_state(FREE)
            entry.state = FREE
            entry.header.release_views()  # the entry is gone; keep no export on the pool map
        finally:
            locks.unlock(self.pool.fd, start)
        self.pool.free(start, entry.handle.extent_bytes)
        return True

    def room(self) -> int:
        """The largest buffer a new entry could get now: free extents merged with those of
        every entry that could be evicted (idle and complete) or reclaimed (failed and
        unmapped). What a stage of that size needs to start here without CacheFullError."""
        with self._lock:
            idle = [e for e in self._entries.values()
                    if e.state == COMPLETE and not self.is_in_use(e)]
            doomed = [e for e in self._doomed if e.done.is_set()
                      and not locks.is_locked(self.pool.fd, e.handle.extent_offset)]
            return self.pool.largest_with([(e.handle.extent_offset, e.handle.extent_bytes)
                                           for e in idle + doomed])

    def entries(self) -> list[dict]:
        """A snapshot for diagnostics and the node's heartbeat, LRU first."""
        with self._lock:
            return [{"key": e.key, "model": e.handle.model, "stage": e.handle.stage,
                     "state": STATE_NAMES[e.state], "bytes": e.handle.size, "pins": e.pins,
                     "readers": locks.count_holders(self.pool.fd, e.handle.extent_offset),
                     "idle_s": time.monotonic() - e.last_used}
                    for e in self._entries.values()]

    def release_views(self) -> None:
        """Drops every header view into the pool mapping, so the pool can be unmapped."""
        with self._lock:
            for entry in [*self._entries.values(), *self._doomed]:
                if hasattr(entry.header, "_u32"):
                    entry.header.release_views()

    def all_live(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())
