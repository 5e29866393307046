"""The node-side prefetcher: fetches a stage's byte ranges into the node's shared-memory cache.

``Prefetcher.prefetch`` returns at once with a ``FetchJob`` whose ``handle`` a worker in another
process can open (``reader.open_buffer``) and read from while the download runs. A second
request for the same (model, stage, layout) shares the entry: a cache hit, no network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpu_runtime.checkpoint import TensorEntry
from gpu_runtime.prefetch.cache import BufferCache, Entry
from gpu_runtime.prefetch.errors import (
    CODE_OF,
    ChecksumError,
    FetchFailedError,
    PrefetchError,
    WaitTimeoutError,
)
from gpu_runtime.prefetch.handle import BufferHandle
from gpu_runtime.prefetch.header import COMPLETE, DATA_OFFSET, FETCHING
from gpu_runtime.prefetch.pool import PoolConfig, ShmPool
from gpu_runtime.prefetch.progress import ContiguousProgress, Verifier
from gpu_runtime.store.fetch import FetchConfig, fetch_chunks, split_chunks
from gpu_runtime.store.link import FetchStats, LinkConfig, NodeLink
from gpu_runtime.store.ranges import plan_stage
from gpu_runtime.store.readers import open_reader

NODE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    """One node's prefetcher: pool size and place, link cap, fetch parallelism, checks."""

    node_id: str = "local"
    shm_dir: str = "/dev/shm"
    pool_bytes: int = 1024 * 1024 * 1024
    prefault: bool = True
    verify_checksums: bool = True
    max_gap_bytes: int = 0
    pin_ttl_s: float = 300.0
    link: LinkConfig = field(default_factory=LinkConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)

    def __post_init__(self) -> None:
        if not NODE_ID_RE.match(self.node_id):
            raise ValueError(f"node_id {self.node_id!r} must be 1-64 characters of "
                             "[A-Za-z0-9_.-]; it names the pool file")
        if self.pin_ttl_s <= 0 or self.max_gap_bytes < 0:
            raise ValueError(f"pin_ttl_s must be > 0 and max_gap_bytes >= 0, got "
                             f"{self.pin_ttl_s} and {self.max_gap_bytes}")

    @property
    def pool_path(self) -> str:
        return f"{self.shm_dir.rstrip('/')}/hydraserve-{self.node_id}.pool"


class FetchJob:
    """A caller's claim on one cached buffer; pins the entry until ``release()``."""

    def __init__(self, entry: Entry, cache: BufferCache, cache_hit: bool) -> None:
        self._entry, self._cache = entry, cache
        self.cache_hit = cache_hit
        self.handle: BufferHandle = entry.handle
        self.layout = entry.layout
        self._released = False

    def wait(self, timeout_s: float | None = None) -> FetchStats:
        """Blocks until the buffer is complete and verified; raises the fetch's error."""
        if not self._entry.done.wait(timeout_s):
            raise WaitTimeoutError(f"fetch of {self.handle.key} not done after {timeout_s} s; "
                                   "the store or the link is slower than expected")
        if self._entry.error is not None:
            raise self._entry.error
        if self.cache_hit:
            return FetchStats(0, 0.0, cache_hit=True)
        assert self._entry.stats is not None, f"{self.handle.key} done without stats or error"
        return self._entry.stats

    @property
    def done(self) -> bool:
        return self._entry.done.is_set()

    def release(self) -> None:
        """Unpins the entry (idempotent); readers' own locks keep protecting what they map."""
        if not self._released:
            self._released = True
            with self._cache._lock:
                self._entry.pins -= 1


class Prefetcher:
    """Owns the node's pool, cache and link; one per node agent."""

    def __init__(self, config: PrefetchConfig = PrefetchConfig()) -> None:
        self.config = config
        self.pool = ShmPool(PoolConfig(config.pool_path, config.pool_bytes, config.prefault))
        self.cache = BufferCache(self.pool, config.pin_ttl_s)
        self.link = NodeLink(config.node_id, config.link)
        self.bad_models: dict[str, str] = {}
        self._threads: list[threading.Thread] = []

    def prefetch(self, model: str, stage: str, uri: str,
                 entries: Sequence[TensorEntry], background: bool = False) -> FetchJob:
        """Starts fetching ``entries`` of checkpoint ``uri`` (unless cached) and returns at once.

        ``model`` and ``stage`` name the buffer (e.g. a model id and ``"pp2-s0"``); the key also
        holds a digest of the layout, so two different splits never share a buffer.
        ``background`` (the rest of a consolidating pipeline): the fetch yields the node's link
        to every foreground fetch, which is every other one.
        """
        layout = plan_stage(entries, self.config.max_gap_bytes)
        key = f"{model}/{stage}/{layout.digest()[:16]}"
        with self.cache._lock:
            entry = self.cache.lookup(key)
            hit = entry is not None
            if entry is None:
                entry = self.cache.create(key, model, stage, layout)
                self.cache.counters["misses"] += 1
            else:
                self.cache.counters["hits"] += 1
            entry.pins += 1
            if not hit:
                t = threading.Thread(target=self._run, args=(entry, uri, background), daemon=True,
                                     name=f"prefetch-{stage}")
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
                t.start()
        return FetchJob(entry, self.cache, hit)

    def _run(self, entry: Entry, uri: str, background: bool = False) -> None:
        layout, h = entry.layout, entry.handle
        base = h.extent_offset + DATA_OFFSET
        data = memoryview(self.pool.mm)[base:base + layout.size]
        chunks = split_chunks(layout, self.config.fetch.chunk_bytes)
        progress = ContiguousProgress(chunks)
        verifier = Verifier(layout.placements, data, progress, entry.header.set_mark,
                            entry.cancel.set, self.config.verify_checksums)
        verifier.start()
        try:
            reader = open_reader(uri, self.config.fetch.retry)
            try:
                with contextlib.nullcontext() if background else self.link.foreground():
                    stats = fetch_chunks(reader, chunks, data, config=self.config.fetch,
                                         link=self.link, on_progress=progress.add,
                                         cancel=entry.cancel, background=background)
            finally:
                reader.close()
            verifier.join()
            if verifier.error is not None:
                raise verifier.error
            entry.header.set_mark(layout.size)
            entry.header.set_state(COMPLETE)
            entry.state, entry.stats = COMPLETE, stats
            # a background fetch's time includes its waits for cold starts: it says nothing
            # about the link's bandwidth, only about its load
            self.link.record(dataclasses.replace(stats, background=background))
        except Exception as exc:  # noqa: BLE001 - recorded in the header, raised to waiters
            progress.abort()
            verifier.join()
            self._fail(entry, verifier.error or exc)
        finally:
            data.release()
            entry.done_at = time.monotonic()
            entry.done.set()

    def _fail(self, entry: Entry, exc: BaseException) -> None:
        _clear_frames(exc)
        if isinstance(exc, ChecksumError):
            error: PrefetchError = exc
            self.bad_models[entry.handle.model] = exc.message
        else:
            error = FetchFailedError(f"fetch of {entry.key} failed: "
                                     f"{getattr(exc, 'message', None) or exc}", "model")
            error.__cause__ = exc
        self.cache.fail(entry, CODE_OF[type(error)], error.message, error)

    def holds(self, model: str, stage: str, entries: Sequence[TensorEntry]) -> bool:
        """Whether the cache holds this stage complete. (The planner learns of cached stages
        from the node's heartbeat, ``cache.entries()``, not from this.)"""
        key = f"{model}/{stage}/{plan_stage(entries, self.config.max_gap_bytes).digest()[:16]}"
        entry = self.cache.peek(key)
        return entry is not None and entry.state == COMPLETE

    def evict_idle(self) -> int:
        """Evicts every idle entry (e.g. on memory pressure); returns how many went."""
        return sum(self.cache.evict(e) for e in self.cache.all_live()) + self.cache.reclaim()

    def close(self, timeout_s: float = 10.0) -> None:
        """Cancels running fetches, waits for them, and removes the pool file."""
        for entry in self.cache.all_live():
            if entry.state == FETCHING:
                entry.cancel.set()
        for t in self._threads:
            t.join(timeout_s)
        self.cache.release_views()
        self.pool.close()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clear_frames(exc: BaseException | None) -> None:
    """Drops the locals of the frames in an error's traceback chain: they hold memoryviews of
    the pool, and the error lives on in the entry (a held view would pin the pool mapping)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        todo += [err.__cause__, err.__context__]
