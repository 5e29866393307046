"""Fair sharing of what tenants (and a tenant's functions) hold at once, when it runs short.

One rule for every pool (docs/api.md, "Fair sharing"): while more than a quarter of a pool is
free, anyone may take from it, up to their hard limits; once only a quarter or less is free,
each user may hold at most an equal part of the other three quarters, shared among the users
holding some (a newcomer counted in). So a tenant alone can take three quarters of a pool, the
last quarter stays free for whoever comes next, and under contention the pool ends up split
evenly. A user over its part is refused with 429; what it already holds is never taken back.

The pools:
- the request slots of an API process: a sync or streaming invocation holds one until it
  answers (``RequestSlots``, in this process's memory). Their number is the process's threads
  for a tenant alone; with several tenants it follows what the cluster serves without queueing
  (``Congestion``: it shrinks while warm invocations take much longer than their function's
  best time to a first token, and grows back while they do not), so a tenant that sends more
  than the cluster can serve is held back before the others' requests wait behind its own;
- the invocations queued or running across the cluster, between tenants
  (``HYDRA_CLUSTER_MAX_IN_FLIGHT``, counted in Postgres at admission, tenants/limits.py);
- a tenant's ``max_concurrency``, between its functions (tenants/limits.py).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter

from hydraserve.errors import RateLimited
from hydraserve.metrics import ADMISSION_LIMIT


def over_share(held: int, in_use: int, capacity: int, holders: int) -> int | None:
    """The part a user holding ``held`` may have of a pool of ``capacity`` with ``in_use``
    taken by ``holders`` users (the asking one included), when it is at or over it while the
    pool is short; None when it may take one more."""
    headroom = capacity // 4  # none in a pool of under 4: too small to keep a part back
    if capacity - in_use > headroom:
        return None
    share = max(1, (capacity - headroom) // max(1, holders))
    return share if held >= share else None


def fair_part(capacity: int, holders: int) -> float:
    """The part of a short pool each of ``holders`` users may have, unrounded."""
    return (capacity - capacity // 4) / max(1, holders)


class Congestion:
    """How many invocations this API process should have in flight at once to keep the cluster
    out of queueing, from the TTFT of the warm invocations it follows (additive increase,
    multiplicative decrease, as TCP and adaptive concurrency limits do).

    A sample is inflated when its TTFT is over ``1.5 x best + 5 ms`` (``INFLATED_FACTOR``,
    ``INFLATED_SLACK_S``), ``best`` being the lowest
    TTFT of that function version seen within the last minute or so (two 30 s windows). Every
    ``STEP_S``: over half of the recent samples inflated, the limit drops by a quarter (not below
    ``floor``); under a fifth, it grows by one (up to ``ceiling``)."""

    STEP_S, WINDOW_S, BEST_S = 0.25, 1.0, 30.0
    # the limit settles where about half of the warm TTFTs sit at this bound: what a tenant
    # that sends at its own pace sees of another's excess (2 x best + 10 ms left a trickle
    # at about twice its latency alone, bench/fairness.py)
    INFLATED_FACTOR, INFLATED_SLACK_S = 1.5, 0.005

    def __init__(self, ceiling: int, floor: int = 2, clock=time.monotonic) -> None:
        self.ceiling, self.floor, self.clock = ceiling, min(floor, ceiling), clock
        self.limit = ceiling
        self._best: dict[int, tuple[float, float, float]] = {}  # version -> (cur, prev, since)
        self._recent: list[tuple[float, bool]] = []  # (when, inflated)
        self._stepped = clock()
        self._lock = threading.Lock()

    def observe(self, version_id: int, ttft_s: float) -> None:
        with self._lock:
            now = self.clock()
            cur, prev, since = self._best.get(version_id, (ttft_s, ttft_s, now))
            if now - since >= self.BEST_S:
                cur, prev, since = ttft_s, cur, now
            cur = min(cur, ttft_s)
            self._best[version_id] = (cur, prev, since)
            bound = self.INFLATED_FACTOR * min(cur, prev) + self.INFLATED_SLACK_S
            self._recent.append((now, ttft_s > bound))
            self._step(now)

    def current(self) -> int:
        with self._lock:
            self._step(self.clock())
            return self.limit

    def _step(self, now: float) -> None:
        if now - self._stepped < self.STEP_S:
            return
        self._stepped = now
        self._recent = [(t, x) for t, x in self._recent if t >= now - self.WINDOW_S]
        inflated = sum(x for _, x in self._recent)
        if self._recent and inflated > len(self._recent) / 2:
            self.limit = max(self.floor, self.limit * 3 // 4)
        elif inflated < len(self._recent) / 5 or not self._recent:
            self.limit = min(self.ceiling, self.limit + 1)
        ADMISSION_LIMIT.set(self.limit)


class RequestSlots:
    """An API process's request threads, shared fairly between tenants (``acquire`` before a
    request starts waiting on its invocation, ``release`` when it answers).

    A tenant that took a slot within the last ``ACTIVE_S`` counts as a holder even between its
    requests: a trickle of short requests holds a slot only now and then, and would otherwise
    leave its part to a tenant that keeps every slot it can get. And a tenant over its part
    now, but whose slots averaged over the last seconds (``AVERAGE_S``) are under half of its
    part (unrounded, ``fair_part``: half a slot at a congestion limit of 2) is let in: a trickle's two requests that happen to overlap are not a tenant taking too much."""

    ACTIVE_S = 5.0
    AVERAGE_S = 2.0

    def __init__(self, capacity: int, congestion: Congestion | None = None,
                 clock=time.monotonic) -> None:
        self.capacity, self.congestion, self.clock = capacity, congestion, clock
        self._held: Counter[int] = Counter()
        self._seen: dict[int, float] = {}  # tenant -> when it last took a slot
        self._average: dict[int, tuple[float, float]] = {}  # tenant -> (slots held, as of)
        self._lock = threading.Lock()

    def acquire(self, tenant_id: int) -> None:
        with self._lock:
            now = self.clock()
            held = self._held[tenant_id]
            active = self._active(now) | {tenant_id}
            capacity = self.capacity
            if len(active) > 1 and self.congestion is not None:
                capacity = min(capacity, self.congestion.current())
            share = over_share(held, sum(self._held.values()), capacity, len(active))
            part = fair_part(capacity, len(active))
            if share is None or self._averaged(tenant_id, now) < part / 2:
                self._change(tenant_id, now, +1)
                self._seen[tenant_id] = now
                return
            holders = len(active)
        raise RateLimited(
            f"over this tenant's fair share of the API's request slots ({held} held of the "
            f"{capacity} this process takes at once now; {share} each while {holders} "
            "tenant(s) use it); retry after 1 s, or invoke with Prefer: respond-async", 1,
            "fair_share")

    def _active(self, now: float) -> set[int]:
        """Tenants holding a slot or seen within ACTIVE_S (forgetting those seen before)."""
        for t in [t for t, at in self._seen.items() if at < now - self.ACTIVE_S]:
            del self._seen[t]
            if not self._held[t]:
                self._average.pop(t, None)
        return set(self._seen) | {t for t, n in self._held.items() if n}

    def _averaged(self, tenant_id: int, now: float) -> float:
        """Slots the tenant held, averaged with weights decaying over AVERAGE_S."""
        value, at = self._average.get(tenant_id, (0.0, now))
        w = math.exp(-(now - at) / self.AVERAGE_S)
        return value * w + (1 - w) * self._held[tenant_id]

    def _change(self, tenant_id: int, now: float, delta: int) -> None:
        self._average[tenant_id] = (self._averaged(tenant_id, now), now)
        self._held[tenant_id] += delta
        if self._held[tenant_id] <= 0:
            del self._held[tenant_id]

    def release(self, tenant_id: int) -> None:
        with self._lock:
            self._change(tenant_id, self.clock(), -1)

    def held(self, tenant_id: int) -> int:
        with self._lock:
            return self._held[tenant_id]
