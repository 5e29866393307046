"""The OpenAPI document, and schemathesis over it: positive and negative requests to every
operation, and stateful runs that follow the document's links."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis.stateful import Bundle, initialize
from schemathesis import GenerationMode
from schemathesis.generation.stateful.state_machine import StepInput
from sqlalchemy import select

from hydraserve.errors import ErrorBody
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


def test_document_links_name_real_operations_and_parameters(client):
    """Each link names an operation of the document and one of its path parameters, and takes
    the value from a field of the source's answer; an invocation's 202 carries them too."""
    doc = client.get("/openapi.json").json
    ops = {op["operationId"]: op for path in doc["paths"].values() for op in path.values()}
    links = {name: (source, link)
             for source in ops.values() for status, answer in source["responses"].items()
             for name, link in answer.get("links", {}).items()}
    assert len(links) >= 12, sorted(links)
    schemas = doc["components"]["schemas"]
    for name, (source, link) in links.items():
        target = ops[link["operationId"]]
        (param, expression), = link["parameters"].items()
        assert param in {p["name"] for p in target["parameters"] if p["in"] == "path"}, name
        success = next(iter(source["responses"].values()))  # listed first
        ref = success["content"]["application/json"]["schema"]["$ref"]
        field = expression.removeprefix("$response.body#/")
        assert field in schemas[ref.rsplit("/", 1)[1]]["properties"], (name, field)
    invoke = ops["post/v1/functions/<name>/invocations"]["responses"]
    assert set(invoke["202"]["links"]) == {"ReadInvocation", "CancelInvocation"}, invoke["202"]


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


AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def check_answer(case, response) -> None:
    """No 5xx, and a 4xx is the API's JSON error body."""
    where = (case.method, case.formatted_path, case.query, case.body)
    assert response.status_code < 500, (where, response.text[:500])
    if response.status_code >= 400:
        assert response.headers["content-type"] == ["application/json"], (where, response.headers)
        error = ErrorBody.model_validate(response.json()).error
        assert error.type and error.message, (where, response.text)


def load(app, paths: str = "^/", mode: GenerationMode = GenerationMode.POSITIVE):
    """The document of ``app``, cut to ``paths``. No security parameters are generated: every
    request carries the admin key, so a check past authentication is what the data reaches
    (and failed authentications would soon be 429 for this client address)."""
    api = schemathesis.openapi.from_wsgi("/openapi.json", app).include(path_regex=paths)
    api.config.generation.update(modes=[mode], with_security_parameters=False)
    return api


def test_negative_requests_are_json_errors(app):
    """Negative data (values the schema forbids, wrong types, missing and unknown fields,
    wrong media types) for every operation that takes input: each answer is a 4xx JSON error
    body or, where the app lets the input pass (an unknown query parameter), a success; never
    a 5xx. (The two list operations without parameters take only the key; test_auth_hardening
    sends bad keys.)"""
    api = load(app, mode=GenerationMode.NEGATIVE)
    operations = [r.ok() for r in api.get_all_operations()
                  if {"parameters", "requestBody"} & set(r.ok().definition.raw)]
    assert len(operations) >= 16, [op.label for op in operations]
    statuses: dict[str, Counter] = {}

    for op in operations:
        @given(case=op.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        @hsettings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
                   database=None)
        def check(case):
            response = case.call(headers=AUTH)
            statuses.setdefault(case.operation.label, Counter())[response.status_code] += 1
            check_answer(case, response)

        check()
    refused = {label for label, seen in statuses.items() if any(400 <= c < 500 for c in seen)}
    assert {op.label for op in operations} - refused == set(), statuses  # each check reached
    assert not any(seen[401] for seen in statuses.values()), statuses


def scenario_base(api, connection, settings, llama_uri: str, seen: Counter, queues: set[str]):
    """The state machine of ``api``'s links, with the admin key on every request. Each scenario
    runs inside a savepoint rolled back at its end, so every scenario starts from the same
    database and a replayed one gets the same answers (hypothesis insists)."""
    from hydraserve.broker import request_queue
    from hydraserve.functions.models import FunctionVersion

    api.config.phases.stateful.inference.algorithms = []  # the document's links alone

    class Scenario(api.as_state_machine()):
        def setup(self):
            self.savepoint = connection.begin_nested()

        def teardown(self):
            rows = connection.execute(select(FunctionVersion.function_id, FunctionVersion.version))
            queues.update(request_queue(f, v, settings.queue_prefix) for f, v in rows)
            self.savepoint.rollback()

        def before_call(self, case):
            case.headers = {**(case.headers or {}), **AUTH, "Prefer": "respond-async"}
            if isinstance(case.body, dict):
                case.body = fit_body(case, llama_uri)

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            seen[(case.method, case.path, response.status_code)] += 1
            check_answer(case, response)

    return Scenario


def fit_body(case, llama_uri: str) -> dict:
    """A generated body made into one the app can accept, so a scenario goes on past its
    first step: whole floats as ints (JSON Schema's integers include 24.0, the API's strict
    types do not), the tiny Llama as the model (a generated URI is never a checkpoint in the
    store), and an input the tiny Llama takes (the sampling settings stay as generated)."""
    body = {k: int(v) if isinstance(v, float) and v.is_integer() else v
            for k, v in case.body.items()}
    if isinstance(body.get("slo"), dict):
        body["slo"] = {k: int(v) if isinstance(v, float) and v.is_integer() else v
                       for k, v in body["slo"].items()}
    if case.path == "/v1/functions/{name}" and (case.method == "PUT" or "model" in body):
        body["model"] = llama_uri
    if case.path == "/v1/functions/{name}/invocations":
        body = {k: v for k, v in body.items() if k not in ("prompt", "messages")}
        body["prompt_ids"] = [1, 2]
    return body


def run_scenarios(machine, examples: int = 50) -> None:
    machine.run(settings=hsettings(machine.TestCase.settings, max_examples=examples,
                                   stateful_step_count=8))


@pytest.fixture
def queues(settings):
    """Names of request queues the test's async invocations declared; deleted at its end."""
    import pika

    from hydraserve.broker import pika_url

    names: set[str] = set()
    yield names
    conn = pika.BlockingConnection(pika.URLParameters(pika_url(settings.broker_url)))
    channel = conn.channel()
    for name in names:
        channel.queue_delete(name)
    conn.close()


def test_stateful_registry(app, connection, settings, llama_uri, queues):
    """Scenarios that register a function and follow the links from there: the function is
    read, patched, invoked (async) and deleted, and its invocations read and cancelled. No
    step answers 5xx, and every error is the JSON error body."""
    api = load(app, r"^/v1/(functions|invocations)")
    seen: Counter = Counter()
    base = scenario_base(api, connection, settings, llama_uri, seen, queues)
    register = api["/v1/functions/{name}"]["PUT"]

    class Registry(base):
        @initialize(target=Bundle("catch_all"), case=register.as_strategy())
        def register_a_function(self, case):
            """Each scenario starts with a registration (a PUT to a generated name is no
            starting point to schemathesis); the links take it from there."""
            self.recorder.record_case(case=case)
            return self.step(StepInput.initial(case))

    run_scenarios(Registry)
    ok = {(m, p) for m, p, status in seen if status < 300}
    function, invocation = "/v1/functions/{name}", "/v1/invocations/{id}"
    assert ("PUT", function) in ok, seen
    assert {("GET", function), ("PATCH", function)} & ok, seen
    assert ("POST", f"{function}/invocations") in ok, seen
    assert {("GET", invocation), ("POST", f"{invocation}/cancel")} & ok, seen
    assert ("DELETE", function) in ok, seen


def test_stateful_admin(app, connection, settings, llama_uri, queues):
    """Scenarios over the admin API: a created tenant is read or gets limits, and gets keys,
    which are revoked. No step answers 5xx, and every error is the JSON error body."""
    api = load(app, r"^/v1/admin/")
    seen: Counter = Counter()
    run_scenarios(scenario_base(api, connection, settings, llama_uri, seen, queues))
    ok = {(m, p) for m, p, status in seen if status < 300}
    tenant = "/v1/admin/tenants/{tenant}"
    assert ("POST", "/v1/admin/tenants") in ok, seen
    assert {("GET", tenant), ("PATCH", tenant)} & ok, seen
    assert ("POST", f"{tenant}/keys") in ok, seen
    assert ("DELETE", "/v1/admin/keys/{key_id}") in ok, seen
