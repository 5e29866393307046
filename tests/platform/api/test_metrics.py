"""/metrics: admin only, Prometheus text that parses, and 429s counted by the limit that
refused them and the tenant."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

ASYNC = {"Prefer": "respond-async"}


@pytest.fixture
def settings(settings):
    return replace(settings, queue_prefix=f"m{uuid.uuid4().hex[:8]}.", sync_deadline_s=0)


def rate_limited(client, admin) -> dict[tuple[str, str], float]:
    resp = client.get("/metrics", headers=admin)
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    families = {f.name: f for f in text_string_to_metric_families(resp.get_data(as_text=True))}
    return {(s.labels["limit"], s.labels["tenant"]): s.value
            for s in families["hydraserve_rate_limited"].samples if s.name.endswith("_total")}


def test_metrics_need_an_admin_key(client, acme):
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=acme).status_code == 403


def test_429s_are_counted_by_limit_and_tenant(client, admin, acme, register):
    assert register(acme, "fn").status_code == 201
    client.patch("/v1/admin/tenants/acme", json={"limits": {"max_concurrency": 1}},
                 headers=admin)
    before = rate_limited(client, admin).get(("max_concurrency", "acme"), 0.0)
    body = {"prompt_ids": [1, 2]}
    assert client.post("/v1/functions/fn/invocations", json=body,
                       headers=acme | ASYNC).status_code == 202
    for _ in range(3):
        assert client.post("/v1/functions/fn/invocations", json=body,
                           headers=acme | ASYNC).status_code == 429
    assert rate_limited(client, admin)[("max_concurrency", "acme")] == before + 3


def test_instances_by_status_and_gb_seconds_by_tenant(client, admin, acme, register, db_session):
    from datetime import timedelta

    from hydraserve.billing.models import UsageRecord
    from hydraserve.db import utcnow
    from tests.platform.test_request_loop import an_instance

    inst = an_instance(db_session, acme, register)  # 1 MiB of a CPU device, starting
    record = db_session.query(UsageRecord).filter_by(instance_id=inst.id).one()
    record.started_at = utcnow() - timedelta(seconds=100)
    db_session.commit()
    resp = client.get("/metrics", headers=admin)
    families = {f.name: f for f in text_string_to_metric_families(resp.get_data(as_text=True))}
    instances = {s.labels["status"]: s.value for s in families["hydraserve_instances"].samples}
    assert instances == {"starting": 1}
    held = {s.labels["tenant"]: s.value for s in families["hydraserve_gb_seconds"].samples}
    assert held.keys() == {"acme"}
    assert abs(held["acme"] - float(record.memory_gb) * 100) < float(record.memory_gb) * 2
