"""Fair sharing of what tenants (and a tenant's functions) hold at once, when it runs short.

One rule for every pool (docs/api.md, "Fair sharing"): while more than a quarter of a pool is
free, anyone may take from it, up to their hard limits; once only a quarter or less is free,
each user may hold at most an equal part of the other three quarters, shared among the users
holding some (a newcomer counted in). So a tenant alone can take three quarters of a pool, the
last quarter stays free for whoever comes next, and under contention the pool ends up split
evenly. A user over its part is refused with 429; what it already holds is never taken back.

The pools:
- the request slots of an API process (its gunicorn threads): a sync or streaming invocation
  holds one until it answers (``RequestSlots``, in this process's memory);
- the invocations queued or running across the cluster, between tenants
  (``HYDRA_CLUSTER_MAX_IN_FLIGHT``, counted in Postgres at admission, tenants/limits.py);
- a tenant's ``max_concurrency``, between its functions (tenants/limits.py).
"""

from __future__ import annotations

import threading
from collections import Counter

from hydraserve.errors import RateLimited


def over_share(held: int, in_use: int, capacity: int, holders: int) -> int | None:
    """The part a user holding ``held`` may have of a pool of ``capacity`` with ``in_use``
    taken by ``holders`` users (the asking one included), when it is at or over it while the
    pool is short; None when it may take one more."""
    headroom = capacity // 4  # none in a pool of under 4: too small to keep a part back
    if capacity - in_use > headroom:
        return None
    share = max(1, (capacity - headroom) // max(1, holders))
    return share if held >= share else None


class RequestSlots:
    """An API process's request threads, shared fairly between tenants (``acquire`` before a
    request starts waiting on its invocation, ``release`` when it answers)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: Counter[int] = Counter()
        self._lock = threading.Lock()

    def acquire(self, tenant_id: int) -> None:
        with self._lock:
            held = self._held[tenant_id]
            holders = sum(1 for n in self._held.values() if n) + (held == 0)
            share = over_share(held, sum(self._held.values()), self.capacity, holders)
            if share is None:
                self._held[tenant_id] += 1
                return
        raise RateLimited(
            f"over this tenant's fair share of the API's request slots ({held} of "
            f"{self.capacity} held; {share} each while {holders} tenant(s) wait on this "
            "process); retry after 1 s, or invoke with Prefer: respond-async", 1, "fair_share")

    def release(self, tenant_id: int) -> None:
        with self._lock:
            self._held[tenant_id] -= 1
            if self._held[tenant_id] <= 0:
                del self._held[tenant_id]

    def held(self, tenant_id: int) -> int:
        with self._lock:
            return self._held[tenant_id]
