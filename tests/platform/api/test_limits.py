"""Per-tenant and per-function limits: set by an admin, checked when an invocation is accepted,
answered 429 with Retry-After and a message naming the limit; concurrent admissions of one
tenant cannot overshoot a limit."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session

from hydraserve.db import utcnow
from hydraserve.functions.models import Function, FunctionVersion, Model
from hydraserve.invocations import ledger
from hydraserve.invocations.models import Invocation
from hydraserve.tenants.limits import Limits, admit
from hydraserve.tenants.models import Tenant

ASYNC = {"Prefer": "respond-async"}


@pytest.fixture
def settings(settings):
    return replace(settings, queue_prefix=f"l{uuid.uuid4().hex[:8]}.", sync_deadline_s=0)


def set_limits(client, admin, tenant: str, **limits):
    return client.patch(f"/v1/admin/tenants/{tenant}", json={"limits": limits}, headers=admin)


def invoke(client, headers, name: str = "fn"):
    return client.post(f"/v1/functions/{name}/invocations", json={"prompt_ids": [1, 2]},
                       headers=headers | ASYNC)


def test_an_admin_reads_and_sets_limits(client, admin, acme):
    got = client.get("/v1/admin/tenants/acme", headers=admin).json
    assert got["limits"] == {"max_concurrency": 64, "max_queued": 1024,
                             "requests_per_minute": 6000, "tokens_per_minute": 2_000_000}
    resp = set_limits(client, admin, "acme", max_queued=5)
    assert resp.status_code == 200 and resp.json["limits"]["max_queued"] == 5
    assert resp.json["limits"]["max_concurrency"] == 64  # the others keep their value
    assert set_limits(client, acme, "acme", max_queued=9).status_code == 403
    bad = set_limits(client, admin, "acme", max_queued=0)
    assert bad.status_code == 400 and bad.json["error"]["param"] == "limits.max_queued"
    assert "changes nothing" in set_limits(client, admin, "acme").json["error"]["message"]
    assert set_limits(client, admin, "nobody", max_queued=3).status_code == 404


def test_over_max_concurrency_is_a_429_that_names_the_limit(client, admin, fn, make_tenant,
                                                            register):
    set_limits(client, admin, "acme", max_concurrency=2)
    assert [invoke(client, fn).status_code for _ in range(2)] == [202, 202]
    resp = invoke(client, fn)
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "1"
    error = resp.json["error"]
    assert (error["type"], error["param"]) == ("rate_limit_error", "max_concurrency")
    assert "tenant's max_concurrency limit of 2" in error["message"]
    other = make_tenant("other")  # another tenant is not held back
    assert register(other, "fn").status_code == 201
    assert invoke(client, other).status_code == 202


def test_max_queued_and_requests_per_minute(client, admin, fn, db_session):
    set_limits(client, admin, "acme", max_queued=1)
    assert invoke(client, fn).status_code == 202
    assert invoke(client, fn).json["error"]["param"] == "max_queued"
    db_session.execute(delete(Invocation))
    db_session.commit()
    set_limits(client, admin, "acme", max_queued=100, requests_per_minute=1)
    resp = invoke(client, fn)  # the minute already counts two accepted invocations
    assert resp.status_code == 429 and resp.json["error"]["param"] == "requests_per_minute"
    assert 1 <= int(resp.headers["Retry-After"]) <= 60


def test_tokens_per_minute_counts_what_workers_record(client, admin, fn, connection):
    set_limits(client, admin, "acme", tokens_per_minute=10)
    inv_id = invoke(client, fn).json["id"]
    ledger.begin(connection, [inv_id], (1,), utcnow())
    ledger.complete(connection, [ledger.Outcome(inv_id, {"text": "x"}, 4, 8, utcnow())])
    resp = invoke(client, fn)
    assert resp.status_code == 429 and resp.json["error"]["param"] == "tokens_per_minute"
    assert "limit of 10 (tokens (prompt and output) per minute)" in resp.json["error"]["message"]


def test_a_functions_own_max_concurrency(client, fn, register):
    assert register(fn, "capped", max_concurrency=1).status_code == 201
    assert invoke(client, fn, "capped").status_code == 202
    resp = invoke(client, fn, "capped")
    assert resp.status_code == 429
    assert "function's max_concurrency limit of 1" in resp.json["error"]["message"]
    assert invoke(client, fn, "fn").status_code == 202  # the tenant's other function goes on
    spec = client.get("/v1/functions/capped", headers=fn).json["spec"]
    assert spec["max_concurrency"] == 1


def test_concurrent_admissions_of_one_tenant_cannot_overshoot(engine):
    """Ten transactions at once against max_concurrency 3: the advisory lock makes each count
    see the rows the ones before it committed, so exactly three get in."""
    tag = uuid.uuid4().hex[:8]
    with Session(engine) as s:
        tenant = Tenant(name=f"race-{tag}", max_concurrency=3)
        model = Model(uri=f"file:///race/{tag}", fingerprint=tag, architecture="x", dtype="x",
                      config={}, total_bytes=1, num_parameters=1, tensors=[], file_sizes={},
                      file_sha256={})
        s.add_all([tenant, model])
        s.flush()
        fn = Function(tenant_id=tenant.id, name="f")
        fn.versions.append(FunctionVersion(version=1, model_id=model.id, ttft_ms=1000,
                                           tpot_ms=100, keep_alive_s=0, min_instances=0,
                                           max_instances=1))
        s.add(fn)
        s.commit()
        ids = (tenant.id, fn.id, fn.versions[0].id, model.id)
    results: list[str] = []
    barrier = threading.Barrier(10)

    def attempt() -> None:
        with Session(engine) as s:
            barrier.wait()
            try:
                admit(s.connection(), ids[0], Limits(max_concurrency=3), ids[2], None)
            except Exception as exc:  # noqa: BLE001 - collected and asserted on below
                results.append(type(exc).__name__)
                return
            s.add(Invocation(id=f"inv_{uuid.uuid4().hex}", tenant_id=ids[0], function_id=ids[1],
                             function_version_id=ids[2], request={}, status="queued"))
            time.sleep(0.05)  # hold the lock a while: the others must wait, not read stale
            s.commit()
            results.append("admitted")

    threads = [threading.Thread(target=attempt) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert sorted(results) == ["RateLimited"] * 7 + ["admitted"] * 3
    finally:
        with Session(engine) as s:
            s.execute(delete(Invocation).where(Invocation.tenant_id == ids[0]))
            s.execute(delete(Function).where(Function.id == ids[1]))
            s.execute(delete(Model).where(Model.id == ids[3]))
            s.execute(delete(Tenant).where(Tenant.id == ids[0]))
            s.commit()


def test_the_per_minute_window_weighs_the_previous_minute_and_forgets_older(connection, fn,
                                                                            db_session):
    from sqlalchemy import text

    from hydraserve.tenants.limits import usage

    tenant_id = db_session.scalar(text("SELECT id FROM tenants WHERE name = 'acme'"))
    version_id = db_session.scalar(text("SELECT id FROM function_versions LIMIT 1"))
    for minutes_ago, requests in ((1, 60), (2, 1000)):
        connection.execute(text(
            "INSERT INTO tenant_usage VALUES (:t, date_trunc('minute', now()) - "
            "make_interval(mins => :m), :r, 0)"), {"t": tenant_id, "m": minutes_ago, "r": requests})
    u = usage(connection, tenant_id, version_id)
    assert 0 <= u.seconds_into_minute < 60
    assert u.requests_per_minute == pytest.approx(60 * (1 - u.seconds_into_minute / 60))
