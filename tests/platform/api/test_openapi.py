"""The OpenAPI document, and a schemathesis run over the registry endpoints."""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings

from tests.conftest import ADMIN_KEY


def test_document_lists_every_route(client):
    doc = client.get("/openapi.json").json
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    assert set(paths["/v1/functions/{name}"]) == {"put", "get", "patch", "delete"}
    assert set(paths["/v1/functions"]) == {"get"}
    body = paths["/v1/functions/{name}"]["put"]["requestBody"]["content"]["application/json"]
    create = doc["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[1]]
    assert create["required"] == ["model", "slo"]
    slo = doc["components"]["schemas"]["Slo"]["properties"]["ttft_ms"]
    assert (slo["minimum"], slo["maximum"]) == (50, 600_000)  # the bounds the validator enforces


def test_document_rules_match_the_app(app):
    from hydraserve.api.openapi import OPERATIONS

    documented = {(op.rule.replace("<int:", "<"), op.method) for op in OPERATIONS}
    served = {(r.rule.replace("<int:", "<"), m) for r in app.url_map.iter_rules()
              for m in r.methods - {"HEAD", "OPTIONS"} if r.rule.startswith("/v1/")}
    assert served == documented


@pytest.fixture
def settings(settings):
    """Queues of these tests live in their own namespace."""
    from dataclasses import replace

    return replace(settings, queue_prefix=f"oa{uuid.uuid4().hex[:8]}.")


def test_no_server_errors_invoking_a_real_function(app, client, settings, llama_uri, db_session):
    """Generated invocation bodies against a registered function (async, so nothing waits
    for a worker that does not exist here): every answer is 202 or a 4xx."""
    import pika

    from hydraserve.broker import pika_url, request_queue

    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    fn = client.put("/v1/functions/fn", headers=headers,
                    json={"model": llama_uri, "slo": {"ttft_ms": 5000, "tpot_ms": 200}})
    assert fn.status_code == 201, fn.json
    api = schemathesis.openapi.from_wsgi("/openapi.json", app)
    op = next(r.ok() for r in api.get_all_operations()
              if r.ok().path == "/v1/functions/{name}/invocations")
    statuses: list[int] = []

    @given(case=op.as_strategy())
    @hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def check(case):
        case.path_parameters = {"name": "fn"}
        response = case.call(headers=headers | {"Prefer": "respond-async"})
        statuses.append(response.status_code)
        assert response.status_code in (202, 400, 415), (case.body, response.text)

    check()
    assert 400 in statuses, statuses  # invalid bodies ran
    # and a valid one is accepted (generated bodies are seldom valid for this model now that
    # their token ids are checked against its 512-token vocabulary before queueing)
    ok = client.post("/v1/functions/fn/invocations", json={"prompt_ids": [1, 2]},
                     headers=headers | {"Prefer": "respond-async"})
    assert ok.status_code == 202, ok.json
    conn = pika.BlockingConnection(pika.URLParameters(pika_url(settings.broker_url)))
    from hydraserve.functions.models import Function

    fn_id = db_session.query(Function).filter_by(name="fn").one().id
    conn.channel().queue_delete(request_queue(fn_id, 1, settings.queue_prefix))
    conn.close()


@pytest.mark.parametrize("prefix", ["/v1/functions", "/v1/admin", "/v1/invocations",
                                    "/v1/models", "/v1/completions", "/v1/chat"])
def test_no_server_errors(app, prefix):
    """Schemathesis generates valid and invalid requests for each operation; none may 500."""
    api = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [r.ok() for r in api.get_all_operations()]
    operations = [op for op in operations if op.path.startswith(prefix)]
    assert operations, f"no operation under {prefix}"
    seen: list[int] = []

    for op in operations:
        @given(case=op.as_strategy())
        @hsettings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case):
            response = case.call(headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            seen.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            if response.status_code >= 400:
                err = response.json()["error"]
                assert err["message"] and err["type"], err

        check()
    assert len(seen) >= len(operations)
