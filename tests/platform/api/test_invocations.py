"""Invocation intake against real Postgres and RabbitMQ (no workers): the row, the durable
message, async answers, validation, and the TTFT breakdown arithmetic."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pika
import pytest

from hydraserve.broker import pika_url, request_queue


@pytest.fixture
def settings(settings):
    from dataclasses import replace

    return replace(settings, queue_prefix=f"u{uuid.uuid4().hex[:8]}.", sync_deadline_s=0)


@pytest.fixture
def broker(settings):
    conn = pika.BlockingConnection(pika.URLParameters(pika_url(settings.broker_url)))
    yield conn.channel()
    conn.close()


def test_async_invocation_is_stored_and_queued(client, acme, register, settings, broker,
                                               db_session):
    from hydraserve.invocations.models import Invocation

    fn = register(acme, "fn").json
    resp = client.post("/v1/functions/fn/invocations", headers=acme | {"Prefer": "respond-async"},
                       json={"prompt": "hello", "max_tokens": 3, "temperature": 0.5})
    assert resp.status_code == 202, resp.json
    assert resp.headers["Location"] == f"/v1/invocations/{resp.json['id']}"
    assert resp.json["status"] == "queued" and resp.json["version"] == fn["alias_version"]
    inv = db_session.get(Invocation, resp.json["id"])
    assert inv.status == "queued" and inv.request["kind"] == "invoke"
    queue = request_queue(inv.function_id, 1, settings.queue_prefix)
    method, props, body = broker.basic_get(queue, auto_ack=True)
    message = json.loads(body)
    assert (message["id"], message["request"]["prompt"]) == (inv.id, "hello")
    assert props.delivery_mode == 2 and props.correlation_id == inv.id
    broker.queue_delete(queue)
    got = client.get(f"/v1/invocations/{inv.id}", headers=acme).json
    assert got["id"] == inv.id and got["status"] == "queued"


def test_sync_past_its_deadline_answers_202(client, acme, register, settings, broker,
                                            db_session):
    from hydraserve.invocations.models import Invocation

    register(acme, "fn")
    resp = client.post("/v1/functions/fn/invocations?timeout_s=0", headers=acme,
                       json={"prompt_ids": [1, 2, 3]})
    assert resp.status_code == 202 and resp.json["status"] == "queued"
    inv = db_session.get(Invocation, resp.json["id"])
    queue = request_queue(inv.function_id, 1, settings.queue_prefix)
    _method, _props, body = broker.basic_get(queue, auto_ack=True)
    assert json.loads(body)["request"]["prompt_ids"] == [1, 2, 3]
    broker.queue_delete(queue)


def test_nul_characters_are_refused(client, acme, register, settings):
    register(acme, "fn")
    resp = client.post("/v1/functions/fn/invocations", headers=acme,
                       json={"prompt": "a\u0000b"})
    assert resp.status_code == 400 and resp.json["error"]["param"] == "prompt"
    assert "NUL" in resp.json["error"]["message"]
    resp = client.patch("/v1/functions/fn", headers=acme, json={"description": "x\u0000"})
    assert resp.status_code == 400 and resp.json["error"]["param"] == "description"


def test_cancel_and_tenant_isolation(client, acme, make_tenant, register, settings, broker,
                                     db_session):
    from hydraserve.functions.models import Function

    register(acme, "fn")
    inv_id = client.post("/v1/functions/fn/invocations", headers=acme | {"Prefer": "respond-async"},
                         json={"prompt": "x"}).json["id"]
    other = make_tenant("other")
    assert client.get(f"/v1/invocations/{inv_id}", headers=other).status_code == 404
    assert client.post(f"/v1/invocations/{inv_id}/cancel", headers=other).status_code == 404
    cancelled = client.post(f"/v1/invocations/{inv_id}/cancel", headers=acme).json
    assert cancelled["status"] == "cancelled" and cancelled["timings"]["finished_at"]
    again = client.post(f"/v1/invocations/{inv_id}/cancel", headers=acme).json
    assert again["timings"]["finished_at"] == cancelled["timings"]["finished_at"]
    fn_id = db_session.query(Function).filter_by(name="fn").one().id
    broker.queue_delete(request_queue(fn_id, 1, settings.queue_prefix))


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "prompt_ids": [1]}, None),
    ({"prompt_ids": []}, "prompt_ids"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
])
def test_invalid_bodies(client, acme, register, body, param):
    register(acme, "fn")
    resp = client.post("/v1/functions/fn/invocations", headers=acme, json=body)
    assert resp.status_code == 400, resp.json
    assert resp.json["error"]["param"] == param


def test_openai_validation(client, acme, register):
    register(acme, "fn")
    resp = client.post("/v1/chat/completions", headers=acme,
                       json={"model": "fn", "messages": [{"role": "user", "content": "x"}], "n": 9})
    assert resp.status_code == 400 and resp.json["error"]["param"] == "n"
    resp = client.post("/v1/completions", headers=acme, json={"model": "nope", "prompt": "x"})
    assert resp.status_code == 404 and resp.json["error"]["param"] == "model"
    models = client.get("/v1/models", headers=acme).json
    assert [m["id"] for m in models["data"]] == ["fn"]


def test_breakdown_phases_clamp_to_arrival():
    from hydraserve.invocations.models import Invocation
    from hydraserve.invocations.schemas import timings

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    at = lambda ms: t0 + timedelta(milliseconds=ms)  # noqa: E731
    cold = Invocation(queued_at=at(0), planned_at=at(20), fetched_at=at(1020), loaded_at=at(1500),
                      first_token_at=at(1600))
    t = timings(cold)
    assert t.breakdown_ms == {"plan": 20, "fetch": 1000, "load": 480, "first_token": 100}
    assert t.ttft_ms == 1600
    # a request that joined a cold start already planned: the plan phase does not count
    joined = Invocation(queued_at=at(500), planned_at=at(20), loaded_at=at(1500),
                        first_token_at=at(1600))
    assert timings(joined).breakdown_ms == {"plan": 0, "load": 1000, "first_token": 100}


def test_a_broker_that_is_down_gets_503_and_the_row_says_why(settings, session_factory, acme,
                                                              register, db_session):
    """The row is written before the publish; when the publish fails the row is failed with
    the reason, so the accepted-then-lost case cannot happen."""
    from dataclasses import replace

    from hydraserve.api.app import create_app
    from hydraserve.invocations.models import Invocation

    register(acme, "fn")
    down = replace(settings, broker_url="amqp://guest:guest@127.0.0.1:1//")
    client = create_app(down, session_factory).test_client()
    resp = client.post("/v1/functions/fn/invocations", headers=acme | {"Prefer": "respond-async"},
                       json={"prompt_ids": [1, 2]})
    assert resp.status_code == 503 and resp.json["error"]["type"] == "service_unavailable"
    inv = db_session.query(Invocation).filter_by(status="failed").one()
    assert "message broker unavailable" in inv.error["message"] and inv.finished_at
