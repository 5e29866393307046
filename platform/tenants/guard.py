"""Failed authentications per client address: after ``limit`` failures within a minute an
address is refused (429) until its oldest failure leaves the window, so keys cannot be guessed
at speed. Kept in each API process's memory: a process counts what it saw (with several
workers an address gets ``limit`` tries per worker per minute)."""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from hydraserve.errors import RateLimited

WINDOW_S = 60.0
MAX_ADDRESSES = 100_000  # beyond this many tracked addresses the oldest are forgotten


class AuthFailures:
    def __init__(self, limit: int, clock=time.monotonic) -> None:
        self.limit, self.clock = limit, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, address: str) -> None:
        """Raises RateLimited while ``address`` is over its budget of failures."""
        with self._lock:
            times = self._recent(address)
            if len(times) < self.limit:
                return
            retry = max(1, math.ceil(times[0] + WINDOW_S - self.clock()))
        raise RateLimited(f"too many failed authentications from this address ({self.limit} a "
                          f"minute); retry after {retry} s with a valid key", retry,
                          "authorization")

    def failed(self, address: str) -> None:
        with self._lock:
            self._recent(address).append(self.clock())
            if len(self._failures) > MAX_ADDRESSES:
                self._failures.pop(next(iter(self._failures)))

    def _recent(self, address: str) -> deque[float]:
        times = self._failures.setdefault(address, deque())
        while times and times[0] <= self.clock() - WINDOW_S:
            times.popleft()
        return times
