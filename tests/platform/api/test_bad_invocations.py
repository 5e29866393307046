"""Bad invocation input is refused up front, on every route, with a short JSON 4xx body: lone
surrogates, deep nesting, oversized bodies, loose types, empty stop strings; nothing is queued."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace

import pytest
from sqlalchemy import func, select

from hydraserve.invocations.models import Invocation

ROUTES = [  # (path, body builder taking the text to put where a prompt goes)
    ("/v1/functions/fn/invocations", lambda text: {"prompt": text}),
    ("/v1/completions", lambda text: {"model": "fn", "prompt": text}),
    ("/v1/chat/completions", lambda text: {"model": "fn",
                                           "messages": [{"role": "user", "content": text}]}),
]


@pytest.fixture
def settings(settings):
    return replace(settings, queue_prefix=f"b{uuid.uuid4().hex[:8]}.", sync_deadline_s=0,
                   max_body_bytes=64 << 10)


def post(client, headers, path: str, raw: str):
    return client.post(path, data=raw, headers=headers | {"Content-Type": "application/json"})


def queued(db_session) -> int:
    return db_session.scalar(select(func.count()).select_from(Invocation))


def assert_error(resp, status: int, fragment: str) -> dict:
    assert resp.status_code == status, resp.data[:300]
    assert resp.mimetype == "application/json"
    error = resp.json["error"]
    assert fragment in error["message"], error
    assert len(resp.data) < 1000, "the error echoes the input"
    return error


def assert_unicode_error(resp, escape: str) -> dict:
    """Our own check says "lone surrogate"; pydantic's strict str check, which runs first on
    some fields, says "unicode string". Either way a 400 that quotes the escape."""
    error = assert_error(resp, 400, escape)
    assert "lone surrogate" in error["message"] or "unicode string" in error["message"], error
    return error


@pytest.mark.parametrize("path,body", ROUTES)
def test_a_lone_surrogate_is_a_400_on_every_route(client, fn, db_session, path, body):
    raw = json.dumps(body("ok \ud800 then"))  # json writes it as the escape \ud800
    assert "\\ud800" in raw
    assert_unicode_error(post(client, fn, path, raw), "\\ud800")
    assert queued(db_session) == 0


@pytest.mark.parametrize("path,_body", ROUTES)
def test_a_lone_surrogate_in_stop_is_a_400(client, fn, path, _body):
    body = _body("hi") | {"stop": ["\udfff"]}
    error = assert_unicode_error(post(client, fn, path, json.dumps(body)), "\\udfff")
    assert error["param"] in ("stop", "stop.0")


def test_deeply_nested_json_is_a_400(client, fn):
    raw = '{"prompt": "hi", "stop": ' + "[" * 20_000 + "]" * 20_000 + "}"
    assert_error(post(client, fn, "/v1/functions/fn/invocations", raw), 400, "nested too deeply")


def test_a_body_over_the_limit_is_a_413_that_does_not_echo_it(client, fn, db_session):
    raw = json.dumps({"prompt": "x" * (100 << 10)})
    assert_error(post(client, fn, "/v1/functions/fn/invocations", raw), 413,
                 "larger than 65536 bytes (HYDRA_MAX_BODY_BYTES)")
    assert queued(db_session) == 0


@pytest.mark.parametrize("path,body,param", [
    ("/v1/functions/fn/invocations", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ("/v1/functions/fn/invocations", {"prompt": "hi", "logprobs": "yes"}, "logprobs"),
    ("/v1/completions", {"model": "fn", "prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": "fn", "prompt": "hi", "max_tokens": True}, "max_tokens"),
])
def test_loose_types_are_refused_not_coerced(client, fn, path, body, param):
    error = assert_error(post(client, fn, path, json.dumps(body)), 400, param)
    assert error["param"] == param


@pytest.mark.parametrize("path,body", [
    ("/v1/functions/fn/invocations", {"prompt": "hi", "stop": [""]}),
    ("/v1/completions", {"model": "fn", "prompt": "hi", "stop": ""}),
    ("/v1/chat/completions", {"model": "fn", "messages": [{"role": "user", "content": "hi"}],
                              "stop": ["ok", ""]}),
])
def test_an_empty_stop_string_is_refused_before_queueing(client, fn, db_session, path, body):
    assert_error(post(client, fn, path, json.dumps(body)), 400, "at least 1 character")
    assert queued(db_session) == 0


def test_an_error_quotes_only_a_short_prefix_of_a_long_value(client, fn):
    body = {"prompt": "hi", "temperature": "7" * 5000}
    error = assert_error(post(client, fn, "/v1/functions/fn/invocations", json.dumps(body)), 400,
                         "(5002 characters)")
    assert error["param"] == "temperature"
