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
import time
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
    request starts waiting on its invocation, ``release`` when it answers).

    A tenant that took a slot within the last ``ACTIVE_S`` counts as a holder even between its
    requests: a trickle of short requests holds a slot only now and then, and would otherwise
    leave its part to a tenant that keeps every slot it can get."""

    ACTIVE_S = 5.0

    def __init__(self, capacity: int, clock=time.monotonic) -> None:
        self.capacity, self.clock = capacity, clock
        self._held: Counter[int] = Counter()
        self._seen: dict[int, float] = {}  # tenant -> when it last took a slot
        self._lock = threading.Lock()

    def acquire(self, tenant_id: int) -> None:
        with self._lock:
            now = self.clock()
            held = self._held[tenant_id]
            active = self._active(now) | {tenant_id}
            share = over_share(held, sum(self._held.values()), self.capacity, len(active))
            if share is None:
                self._held[tenant_id] += 1
                self._seen[tenant_id] = now
                return
            holders = len(active)
        raise RateLimited(
            f"over this tenant's fair share of the API's request slots ({held} of "
            f"{self.capacity} held; {share} each while {holders} tenant(s) use this process); "
            "retry after 1 s, or invoke with Prefer: respond-async", 1, "fair_share")

    def _active(self, now: float) -> set[int]:
        """Tenants holding a slot or seen within ACTIVE_S (forgetting those seen before)."""
        for t in [t for t, at in self._seen.items() if at < now - self.ACTIVE_S]:
            del self._seen[t]
        return set(self._seen) | {t for t, n in self._held.items() if n}

    def release(self, tenant_id: int) -> None:
        with self._lock:
            self._held[tenant_id] -= 1
            if self._held[tenant_id] <= 0:
                del self._held[tenant_id]

    def held(self, tenant_id: int) -> int:
        with self._lock:
            return self._held[tenant_id]
