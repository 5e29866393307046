"""Emulated network links: a per-node bandwidth cap and the throughput each fetch achieved.

On one test machine every emulated node shares loopback, so the fetcher itself enforces each
node's link: all fetches of a node draw from that node's token bucket, whatever the number of
connections they use. Off by default (``LinkConfig()`` has no cap). MB means 10**6 bytes.

A background fetch (the rest of a model a pipeline consolidates into, docs/consolidation.md)
throttles through ``NodeLink.background_throttle``: it waits while any foreground fetch (a cold
start, inside ``foreground()``) is on the link, so it only takes what cold starts leave.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from gpu_runtime.limits import MB


class TokenBucket:
    """A thread-safe token bucket of ``rate`` bytes per second holding at most ``burst`` bytes.

    ``consume(n)`` reserves ``n`` bytes at once and sleeps off any debt outside the lock, so
    concurrent callers share the rate and a request larger than the burst still works.
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: int) -> None:
        if rate_bytes_per_s <= 0 or burst_bytes <= 0:
            raise ValueError(f"token bucket needs rate > 0 and burst > 0, got "
                             f"rate={rate_bytes_per_s} B/s burst={burst_bytes} B")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst_bytes)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, n: int) -> float:
        """Takes ``n`` bytes of budget, blocking until they are paid; returns seconds slept."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
        return wait


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """The emulated link of one node; ``bandwidth_mb_s=None`` means no cap (production)."""

    bandwidth_mb_s: float | None = None
    burst_bytes: int | None = None  # default: 50 ms of the rate, at least 256 KiB

    def __post_init__(self) -> None:
        if self.bandwidth_mb_s is not None and not self.bandwidth_mb_s > 0:
            raise ValueError(f"bandwidth_mb_s must be > 0 or None (no cap), "
                             f"got {self.bandwidth_mb_s}")
        if self.burst_bytes is not None and self.burst_bytes <= 0:
            raise ValueError(f"burst_bytes must be > 0 or None, got {self.burst_bytes}")


@dataclass(frozen=True, slots=True)
class FetchStats:
    """What one fetch moved and how fast: the figure the planner uses as achieved bandwidth."""

    bytes: int
    seconds: float
    num_requests: int = 0
    num_retries: int = 0
    num_connections: int = 0
    cache_hit: bool = False
    background: bool = False  # yielded to foreground fetches: not a bandwidth sample

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "seconds": self.seconds, "mb_per_s": self.mb_per_s,
                "num_requests": self.num_requests, "num_retries": self.num_retries,
                "num_connections": self.num_connections, "cache_hit": self.cache_hit}


class NodeLink:
    """One node's link: the shared bucket (when capped) and a history of finished fetches."""

    def __init__(self, node_id: str, config: LinkConfig = LinkConfig(), history: int = 64) -> None:
        self.node_id = node_id
        self.config = config
        self.bucket: TokenBucket | None = None
        if config.bandwidth_mb_s is not None:
            rate = config.bandwidth_mb_s * MB
            burst = config.burst_bytes or max(256 * 1024, int(rate / 20))
            self.bucket = TokenBucket(rate, burst)
        self._history: deque[FetchStats] = deque(maxlen=history)
        self.total_bytes = 0  # every network fetch's, since the node started
        self.total_seconds = 0.0
        self._lock = threading.Lock()
        self._foreground = 0  # foreground fetches on the link now
        self.background_wait_s = 0.0  # what background fetches spent yielding to them

    def throttle(self, n: int) -> None:
        """Blocks until the link can carry ``n`` more bytes (no-op without a cap)."""
        if self.bucket is not None:
            self.bucket.consume(n)

    @contextlib.contextmanager
    def foreground(self) -> Iterator[None]:
        """Marks a fetch that background fetches yield to while it runs."""
        with self._lock:
            self._foreground += 1
        try:
            yield
        finally:
            with self._lock:
                self._foreground -= 1

    def background_throttle(self, n: int) -> None:
        """``throttle`` for a background fetch: first waits until no foreground fetch is on the
        link (polled every 10 ms), then takes its bytes from the same bucket."""
        started = time.monotonic()
        while self._foreground > 0:
            time.sleep(0.01)
        self.background_wait_s += time.monotonic() - started
        self.throttle(n)

    def record(self, stats: FetchStats) -> None:
        with self._lock:
            self._history.append(stats)
            self.total_bytes += stats.bytes
            self.total_seconds += stats.seconds

    def recent(self) -> list[FetchStats]:
        """Finished network fetches of this node, oldest first (cache hits are not recorded)."""
        with self._lock:
            return list(self._history)

    def recent_rate(self, last: int = 8, min_bytes: int = 0) -> float | None:
        """Bytes per second of the last ``last`` foreground fetches of at least ``min_bytes``
        together; None before any."""
        recent = [f for f in self.recent() if f.bytes >= min_bytes and not f.background][-last:]
        seconds = sum(f.seconds for f in recent)
        return sum(f.bytes for f in recent) / seconds if seconds > 0 else None
