"""Per-tenant and per-function limits, checked when an invocation is accepted.

A tenant's limits live in its row (an admin sets them: ``PATCH /v1/admin/tenants/<name>``,
``hydraserve admin set-limits``): invocations in flight (queued or running), invocations
queued, invocations accepted per minute and tokens (prompt + output) per minute; a function
version may also cap its own invocations in flight. Over one: 429 with ``Retry-After`` and a
message naming the limit and its value. The check holds a per-tenant advisory lock until the
accepting transaction commits, so concurrent requests of one tenant cannot all pass a count
that only one of them fits under. Per-minute figures are a sliding window over two one-minute
buckets of ``tenant_usage``. Within those limits, fair shares (tenants/fairness.py): of the
tenant's ``max_concurrency`` between its functions, and of the cluster's
``HYDRA_CLUSTER_MAX_IN_FLIGHT`` between tenants.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

from hydraserve.errors import RateLimited
from hydraserve.tenants.fairness import over_share

LOCK_SPACE = 0x4C494D  # "LIM": advisory-lock keys are (LOCK_SPACE, tenant id)
FIELDS = ("max_concurrency", "max_queued", "requests_per_minute", "tokens_per_minute")


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrency: int = 64
    max_queued: int = 1024
    requests_per_minute: int = 6000
    tokens_per_minute: int = 2_000_000


@dataclass(frozen=True, slots=True)
class Usage:
    """What a tenant has in flight now and used over the last minute (sliding window)."""

    in_flight: int
    queued: int
    version_in_flight: int
    versions_in_flight: int  # the tenant's function versions with invocations in flight
    functions: int  # the tenant's functions (not deleted)
    cluster_in_flight: int  # every tenant's
    tenants_in_flight: int  # tenants with invocations in flight
    requests_per_minute: float
    tokens_per_minute: float
    seconds_into_minute: float


# Two statements: under READ COMMITTED a statement reads the snapshot taken when it starts, so
# the counts must start after the lock is held to see what the lock's last holder committed.
LOCK = text("SELECT pg_advisory_xact_lock(:space, :tenant_id)")
COUNTS = text("""
    WITH bucket AS (SELECT date_trunc('minute', now()) AS this)
    SELECT c.in_flight, c.queued, c.version_in_flight, c.versions_in_flight,
           k.cluster_in_flight, k.tenants_in_flight,
           (SELECT count(*) FROM functions
            WHERE tenant_id = :tenant_id AND deleted_at IS NULL) AS functions,
           coalesce(cur.requests, 0) AS requests, coalesce(cur.tokens, 0) AS tokens,
           coalesce(prev.requests, 0) AS prev_requests, coalesce(prev.tokens, 0) AS prev_tokens,
           extract(epoch FROM now() - bucket.this) AS into_minute
    FROM bucket
    CROSS JOIN (SELECT count(*) AS in_flight,
                       count(*) FILTER (WHERE status = 'queued') AS queued,
                       count(*) FILTER (WHERE function_version_id = :version_id)
                           AS version_in_flight,
                       count(DISTINCT function_version_id) AS versions_in_flight
                FROM invocations
                WHERE tenant_id = :tenant_id AND status IN ('queued', 'running')) c
    CROSS JOIN (SELECT count(*) AS cluster_in_flight,
                       count(DISTINCT tenant_id) AS tenants_in_flight
                FROM invocations WHERE status IN ('queued', 'running')) k
    LEFT JOIN tenant_usage cur ON cur.tenant_id = :tenant_id AND cur.minute = bucket.this
    LEFT JOIN tenant_usage prev
           ON prev.tenant_id = :tenant_id AND prev.minute = bucket.this - interval '1 minute'""")
COUNT_REQUEST = text("""
    INSERT INTO tenant_usage (tenant_id, minute, requests, tokens)
    VALUES (:tenant_id, date_trunc('minute', now()), 1, 0)
    ON CONFLICT (tenant_id, minute) DO UPDATE SET requests = tenant_usage.requests + 1""")
COUNT_TOKENS = text("""
    INSERT INTO tenant_usage (tenant_id, minute, requests, tokens)
    VALUES (:tenant_id, date_trunc('minute', now()), 0, :tokens)
    ON CONFLICT (tenant_id, minute) DO UPDATE SET tokens = tenant_usage.tokens + :tokens""")


def usage(conn: Connection, tenant_id: int, version_id: int) -> Usage:
    """Takes the tenant's admission lock (until the transaction ends) and reads its usage."""
    conn.execute(LOCK, {"space": LOCK_SPACE, "tenant_id": tenant_id})
    r = conn.execute(COUNTS, {"tenant_id": tenant_id, "version_id": version_id}).one()
    into = float(r.into_minute)
    weight = 1 - into / 60  # the share of the previous minute still inside the window
    return Usage(r.in_flight, r.queued, r.version_in_flight, r.versions_in_flight, r.functions,
                 r.cluster_in_flight, r.tenants_in_flight,
                 r.requests + r.prev_requests * weight, r.tokens + r.prev_tokens * weight, into)


def admit(conn: Connection, tenant_id: int, limits: Limits, version_id: int,
          version_max_concurrency: int | None, cluster_max_in_flight: int = 0) -> None:
    """Raises RateLimited when one more invocation would pass a limit or a fair share;
    otherwise counts it (in the caller's transaction, which must commit or roll back soon: it
    holds the lock)."""
    u = usage(conn, tenant_id, version_id)
    per_minute_wait = max(1, math.ceil(60 - u.seconds_into_minute))
    checks = [  # (over it, scope, limit, its value, what it counts, seconds to retry after)
        (u.in_flight >= limits.max_concurrency, "tenant", "max_concurrency",
         limits.max_concurrency, "invocations queued or running at once", 1),
        (u.queued >= limits.max_queued, "tenant", "max_queued", limits.max_queued,
         "invocations waiting to start", 1),
        (u.requests_per_minute >= limits.requests_per_minute, "tenant", "requests_per_minute",
         limits.requests_per_minute, "invocations accepted per minute", per_minute_wait),
        (u.tokens_per_minute >= limits.tokens_per_minute, "tenant", "tokens_per_minute",
         limits.tokens_per_minute, "tokens (prompt and output) per minute", per_minute_wait),
    ]
    if version_max_concurrency is not None:
        checks.append((u.version_in_flight >= version_max_concurrency, "function",
                       "max_concurrency", version_max_concurrency,
                       "invocations of this function queued or running at once", 1))
    for over, scope, name, value, what, retry in checks:
        if over:
            raise RateLimited(f"over the {scope}'s {name} limit of {value} ({what}); retry "
                              f"after {retry} s, or ask an admin to raise it", retry, name)
    check_fair_shares(u, limits, cluster_max_in_flight)
    conn.execute(COUNT_REQUEST, {"tenant_id": tenant_id})


def check_fair_shares(u: Usage, limits: Limits, cluster_max_in_flight: int) -> None:
    """Raises RateLimited when this function is over its share of the tenant's concurrency,
    or the tenant over its share of the cluster's, while that pool is short. (A tenant with
    one function has nothing to share its concurrency with: the function may use all of it.)"""
    share = over_share(u.version_in_flight, u.in_flight, limits.max_concurrency,
                       u.versions_in_flight + (u.version_in_flight == 0))
    if share is not None and u.functions > 1:
        raise RateLimited(
            f"over this function's fair share of the tenant's max_concurrency of "
            f"{limits.max_concurrency} ({u.version_in_flight} in flight, {share} each while "
            f"{u.versions_in_flight} functions have work); retry after 1 s", 1, "fair_share")
    if cluster_max_in_flight:
        share = over_share(u.in_flight, u.cluster_in_flight, cluster_max_in_flight,
                           u.tenants_in_flight + (u.in_flight == 0))
        if share is not None:
            raise RateLimited(
                f"the cluster is busy ({u.cluster_in_flight} invocations in flight of "
                f"HYDRA_CLUSTER_MAX_IN_FLIGHT={cluster_max_in_flight}) and this tenant has its "
                f"fair share ({u.in_flight} in flight, {share} each while "
                f"{u.tenants_in_flight} tenants have work); retry after 1 s", 1, "fair_share")


def count_tokens(conn: Connection, tokens_by_tenant: Mapping[int, int]) -> None:
    """Adds processed tokens to each tenant's current minute (the worker, per batch)."""
    for tenant_id, tokens in tokens_by_tenant.items():
        if tokens:
            conn.execute(COUNT_TOKENS, {"tenant_id": tenant_id, "tokens": tokens})
