"""An invocation the worker would refuse is answered 400 before it is queued (no cold start is
paid for it), on every route and for streams too."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from tests.platform.conftest import invocation_count as count

LONG = "hello world " * 400  # well over the tiny model's 512-token context


@pytest.fixture
def settings(settings):
    return replace(settings, queue_prefix=f"a{uuid.uuid4().hex[:8]}.", sync_deadline_s=0)


@pytest.mark.parametrize("path,body,param,fragment", [
    ("/v1/functions/fn/invocations", {"prompt_ids": [1, 512]}, "prompt_ids",
     "token id 512 is outside the vocabulary; allowed 0..511"),
    ("/v1/functions/fn/invocations", {"prompt": LONG}, "prompt", "allowed at most 511"),
    ("/v1/functions/fn/invocations", {"messages": [{"role": "user", "content": LONG}]},
     "messages", "(context 512 tokens"),
    ("/v1/completions", {"model": "fn", "prompt": LONG}, "prompt", "allowed at most 511"),
    ("/v1/completions", {"model": "fn", "prompt": [7, 9999]}, "prompt_ids",
     "outside the vocabulary"),
])
def test_input_the_model_cannot_take_is_a_400_before_queueing(client, fn, db_session, path,
                                                               body, param, fragment):
    resp = client.post(path, json=body, headers=fn)
    assert resp.status_code == 400, resp.json
    assert resp.json["error"]["param"] == param and fragment in resp.json["error"]["message"]
    assert count(db_session) == 0


def test_a_stream_gets_the_400_instead_of_a_200_stream(client, fn, db_session):
    resp = client.post("/v1/functions/fn/invocations", json={"prompt": LONG},
                       headers=fn | {"Accept": "text/event-stream"})
    assert resp.status_code == 400 and resp.mimetype == "application/json"
    assert count(db_session) == 0


def test_messages_need_a_chat_template(client, acme, register, db_session, no_template_model):
    assert register(acme, "plain", model=no_template_model.as_uri()).status_code == 201
    for path, body in [("/v1/functions/plain/invocations",
                        {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/chat/completions",
                        {"model": "plain", "messages": [{"role": "user", "content": "hi"}]})]:
        resp = client.post(path, json=body, headers=acme)
        assert resp.status_code == 400, resp.json
        assert resp.json["error"]["param"] == "messages"
        assert "no chat_template" in resp.json["error"]["message"]
    assert count(db_session) == 0


def test_an_input_that_fits_is_accepted(client, fn, db_session):
    resp = client.post("/v1/functions/fn/invocations", json={"prompt": "hello world"},
                       headers=fn | {"Prefer": "respond-async"})
    assert resp.status_code == 202, resp.json
    assert count(db_session) == 1
