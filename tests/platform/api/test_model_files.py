"""What the API reads from a checkpoint's files besides tokenizer.json: the chat template from
chat_template.jinja, a template that raises is a 400 for that request alone, and the sampling
defaults of generation_config.json fill what a request leaves unset."""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import replace

import pytest
from sqlalchemy import select

from hydraserve.invocations.models import Invocation

CHAT = [{"role": "user", "content": "hi"}]
ASYNC = {"Prefer": "respond-async"}


@pytest.fixture
def settings(settings):
    return replace(settings, queue_prefix=f"m{uuid.uuid4().hex[:8]}.", sync_deadline_s=0)


@pytest.fixture
def variant(store_root):
    """A copy of the tiny Llama under the store root, changed by ``edit``."""
    def make(name: str, edit) -> str:
        model = store_root / f"llama-{name}"
        if not model.exists():
            shutil.copytree(store_root / "llama-tiny", model)
            edit(model)
        return model.as_uri()

    return make


def without_template(model):
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    template = cfg.pop("chat_template")
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    return template


def test_the_template_in_chat_template_jinja_is_used(client, acme, register, variant,
                                                     db_session):
    uri = variant("jinja", lambda m: (m / "chat_template.jinja").write_text(
        without_template(m)))
    assert register(acme, "jinja", model=uri).status_code == 201
    resp = client.post("/v1/functions/jinja/invocations", json={"messages": CHAT},
                       headers=acme | ASYNC)
    assert resp.status_code == 202, resp.json
    assert db_session.scalars(select(Invocation.id)).all() == [resp.json["id"]]


def test_a_template_that_raises_is_a_400_for_that_request(client, acme, register, variant,
                                                          db_session):
    def edit(model):
        cfg = json.loads((model / "tokenizer_config.json").read_text())
        cfg["chat_template"] = ("{% if messages[0]['role'] != 'system' %}"
                                "{{ raise_exception('the first message must be system') }}"
                                "{% endif %}{{ messages[0]['content'] }}")
        (model / "tokenizer_config.json").write_text(json.dumps(cfg))

    assert register(acme, "strict", model=variant("strict", edit)).status_code == 201
    for path, body in [("/v1/functions/strict/invocations", {"messages": CHAT}),
                       ("/v1/chat/completions", {"model": "strict", "messages": CHAT})]:
        resp = client.post(path, json=body, headers=acme)
        assert resp.status_code == 400, resp.json
        assert resp.json["error"]["param"] == "messages"
        assert "the first message must be system" in resp.json["error"]["message"]
    assert db_session.scalars(select(Invocation.id)).all() == []
    ok = client.post("/v1/functions/strict/invocations", headers=acme | ASYNC,
                     json={"messages": [{"role": "system", "content": "x"}] + CHAT})
    assert ok.status_code == 202, ok.json  # the same model takes messages it accepts


def test_generation_config_sampling_defaults_fill_unset_fields(client, acme, register, variant,
                                                               db_session):
    uri = variant("sampling", lambda m: (m / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20})))
    assert register(acme, "sampled", model=uri).status_code == 201

    def stored(body: dict) -> dict:
        resp = client.post("/v1/functions/sampled/invocations", json=body, headers=acme | ASYNC)
        assert resp.status_code == 202, resp.json
        return db_session.get(Invocation, resp.json["id"]).request

    req = stored({"prompt": "hello"})
    assert (req["temperature"], req["top_p"], req["top_k"]) == (0.7, 0.8, 20)
    assert isinstance(req["seed"], int)  # sampled: a seed, so a retry makes the same tokens
    req = stored({"prompt": "hello", "temperature": 0.0, "top_k": 5})
    assert (req["temperature"], req["top_p"], req["top_k"]) == (0.0, 0.8, 5)
    assert "seed" not in req


def test_without_generation_config_the_api_defaults_stay(client, acme, register, db_session):
    assert register(acme, "fn").status_code == 201
    resp = client.post("/v1/functions/fn/invocations", json={"prompt": "hello"},
                       headers=acme | ASYNC)
    req = db_session.get(Invocation, resp.json["id"]).request
    assert (req["temperature"], req["top_p"], req["top_k"]) == (0.0, 1.0, 0)


def test_openai_requests_take_the_models_defaults_then_openais(client, acme, register, variant,
                                                              db_session):
    uri = variant("sampling-oai", lambda m: (m / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.8})))
    assert register(acme, "sampled", model=uri).status_code == 201
    assert register(acme, "plain").status_code == 201

    def stored(body: dict) -> dict:
        """The request an OpenAI completion stored (a stream, closed at once: no worker)."""
        resp = client.post("/v1/completions", headers=acme, buffered=False,
                           json={"prompt": "hello", "stream": True} | body)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        inv = db_session.scalars(select(Invocation).order_by(Invocation.queued_at.desc())
                                 .limit(1)).one()
        resp.close()  # the client goes away: the invocation is cancelled
        return inv.request

    req = stored({"model": "sampled"})  # the model's generation_config.json
    assert (req["temperature"], req["top_p"]) == (0.7, 0.8) and isinstance(req["seed"], int)
    req = stored({"model": "sampled", "temperature": 0.2})  # what the request sets wins
    assert (req["temperature"], req["top_p"]) == (0.2, 0.8)
    req = stored({"model": "plain"})  # no generation_config.json: OpenAI's own defaults
    assert (req["temperature"], req["top_p"], req["top_k"]) == (1.0, 1.0, 0)
