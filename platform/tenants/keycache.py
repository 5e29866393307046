"""Recently authenticated keys, in each API process's memory: every request authenticates,
and a refused one (a 429 over a fair share, say) should cost no database round trip at all.
An entry lives ``TTL_S``; a key revoked or a tenant's limits changed through this process
clear it at once, through another API process within ``TTL_S`` (docs/api.md)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from hydraserve.tenants.service import Principal

TTL_S = 2.0
MAX_KEYS = 10_000


class KeyCache:
    def __init__(self, ttl_s: float = TTL_S, clock=time.monotonic) -> None:
        self.ttl_s, self.clock = ttl_s, clock
        self._keys: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> Principal | None:
        with self._lock:
            hit = self._keys.get(digest)
            if hit is None:
                return None
            if hit[1] <= self.clock():
                del self._keys[digest]
                return None
            return hit[0]

    def put(self, digest: str, who: Principal) -> None:
        with self._lock:
            self._keys[digest] = (who, self.clock() + self.ttl_s)
            self._keys.move_to_end(digest)
            while len(self._keys) > MAX_KEYS:
                self._keys.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()
