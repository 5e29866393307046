"""What the OpenAI-compatible routes refuse before queueing (400s naming the field), what they
accept and pass on to the worker, and the model objects."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from hydraserve.invocations.schemas import ChatRequest, CompletionRequest, InvokeRequest
from tests.platform.conftest import invocation_count as count

CHAT = {"model": "fn", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "fn", "prompt": "hi"}


@pytest.fixture
def settings(settings):
    return replace(settings, queue_prefix=f"o{uuid.uuid4().hex[:8]}.", sync_deadline_s=0)


@pytest.mark.parametrize("path,body,param,fragment", [
    *[("/v1/chat/completions", CHAT | {name: value}, name, f"{name} is not supported")
      for name, value in [("tools", [{"type": "function", "function": {"name": "f"}}]),
                          ("tool_choice", "auto"), ("functions", [{"name": "f"}]),
                          ("function_call", "auto"), ("audio", {"voice": "alloy"}),
                          ("modalities", ["text", "audio"]), ("prediction", {"type": "content"}),
                          ("web_search_options", {})]],
    ("/v1/completions", COMPLETION | {"suffix": "x"}, "suffix", "suffix is not supported"),
    ("/v1/completions", COMPLETION | {"best_of": 3}, "best_of", "best_of is not supported"),
    ("/v1/chat/completions", CHAT | {"n": 9}, "n", "8"),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format", "Invalid type: nope"),
    ("/v1/chat/completions", CHAT | {"logit_bias": {"512": 5}}, "logit_bias",
     "logit_bias token id 512 is outside the vocabulary; allowed 0..511"),
    ("/v1/chat/completions", CHAT | {"logit_bias": {"abc": 5}}, "logit_bias",
     "is not a token id"),
    ("/v1/chat/completions", CHAT | {"logit_bias": {"5": 101}}, "logit_bias", "-100..100"),
    ("/v1/chat/completions", CHAT | {"presence_penalty": 2.5}, "presence_penalty", "2"),
    ("/v1/chat/completions", CHAT | {"repetition_penalty": 0}, "repetition_penalty", "0"),
    ("/v1/chat/completions", CHAT | {"top_logprobs": 3}, "top_logprobs", "needs logprobs=true"),
    ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "20"),
    ("/v1/completions", COMPLETION | {"logprobs": 6}, "logprobs", "5"),
    ("/v1/completions", COMPLETION | {"logprobs": 2, "echo": True}, "echo",
     "echo with logprobs is not supported"),
    ("/v1/chat/completions", CHAT | {"stream_options": {"include_usage": True}}, None,
     "stream_options is only allowed with stream=true"),
    ("/v1/chat/completions", {"model": "fn", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages.0.content",
     "content part type 'image_url' is not supported"),
    ("/v1/chat/completions", {"model": "fn", "messages": [{"role": "tool", "content": "x"}]},
     "messages.0.role", "'developer'"),
])
def test_what_would_change_the_result_is_refused_by_name(client, fn, db_session, path, body,
                                                         param, fragment):
    resp = client.post(path, json=body, headers=fn)
    assert resp.status_code == 400, resp.json
    assert resp.json["error"]["param"] == param, resp.json
    assert fragment in resp.json["error"]["message"], resp.json
    assert count(db_session) == 0


def test_neutral_values_and_fields_that_change_nothing_are_accepted():
    body = CHAT | {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                   "parallel_tool_calls": True, "tools": [], "tool_choice": "none",
                   "modalities": ["text"], "response_format": {"type": "text"}}
    req = ChatRequest.model_validate(body)
    assert req.sampling(16)["response_format"] == {"type": "text"}


def test_chat_fields_pass_on_to_the_invocation():
    req = ChatRequest.model_validate({
        "model": "fn", "max_completion_tokens": 7, "max_tokens": 99, "logprobs": True,
        "top_logprobs": 4, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.2, "logit_bias": {"3": -100}, "stop": "END", "n": 1,
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "name": "ann", "content": [
                         {"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]})
    inv = InvokeRequest.model_validate({"messages": [m.native() for m in req.messages]}
                                       | req.sampling(16))
    assert inv.max_tokens == 7  # max_completion_tokens wins over the older max_tokens
    assert (inv.logprobs, inv.top_logprobs) == (True, 4)
    assert (inv.presence_penalty, inv.frequency_penalty, inv.repetition_penalty) == (
        0.5, -0.5, 1.2)
    assert inv.logit_bias == {"3": -100} and inv.stop == ["END"]
    assert [m.model_dump(exclude_none=True) for m in inv.messages] == [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "one\ntwo", "name": "ann"}]


def test_completion_logprobs_become_top_logprobs():
    req = CompletionRequest.model_validate(COMPLETION | {"logprobs": 3})
    assert {k: req.sampling(16)[k] for k in ("logprobs", "top_logprobs")} == {
        "logprobs": True, "top_logprobs": 3}
    assert "logprobs" not in CompletionRequest.model_validate(COMPLETION).sampling(16)


def test_models_list_and_retrieve_with_max_model_len(client, fn):
    listed = client.get("/v1/models", headers=fn)
    assert listed.status_code == 200
    (model,) = [m for m in listed.json["data"] if m["id"] == "fn"]
    assert model["max_model_len"] == 512 and model["object"] == "model"
    one = client.get("/v1/models/fn", headers=fn)
    assert one.status_code == 200 and one.json == model
    for missing in ("nope", "Not-A-Name"):
        resp = client.get(f"/v1/models/{missing}", headers=fn)
        assert resp.status_code == 404, resp.json
        assert resp.json["error"]["type"] == "not_found_error"
        assert "does not exist" in resp.json["error"]["message"]
