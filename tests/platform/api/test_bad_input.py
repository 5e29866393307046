"""Every kind of bad input gets a clear 4xx in the one JSON error shape, never a 500."""

from __future__ import annotations

import json
import shutil
import struct

import pytest


def error_of(resp, status: int, fragment: str, param: str | None = "keep") -> dict:
    assert resp.status_code == status, (resp.status_code, resp.json)
    err = resp.json["error"]
    assert set(err) == {"type", "message", "param"}
    assert fragment in err["message"], err["message"]
    if param != "keep":
        assert err["param"] == param, err
    return err


@pytest.fixture
def broken(store_root, tmp_path_factory):
    """A copy of the tiny llama inside the store root, to be damaged by each test."""

    def make(name: str):
        dst = store_root / f"broken-{name}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(store_root / "llama-tiny", dst)
        return dst

    return make


def test_unknown_architecture(acme, register, broken):
    d = broken("arch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    err = error_of(register(acme, model=d.as_uri()), 422, "MambaForCausalLM", "model")
    assert "LlamaForCausalLM" in err["message"] and "OPTForCausalLM" in err["message"]


@pytest.mark.parametrize("change,fragment", [
    ({"hidden_act": "gelu"}, "hidden_act"),  # the runtime's parser refuses what it lacks
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_size": -64}, "must be > 0"),
    ({"num_attention_heads": None}, "num_attention_heads"),
    ({"num_hidden_layers": 2.5}, "non-integer"),
])
def test_a_config_the_runtime_rejects_is_refused_at_registration(acme, register, broken, change,
                                                                 fragment):
    """Registration runs config.json through the runtime's own parser, so a model that could
    never start is a 422 now, not a cold start that fails on every try."""
    d = broken("runtime-cfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    for key in [k for k, v in change.items() if v is None]:
        del cfg[key]
    (d / "config.json").write_text(json.dumps(cfg))
    error_of(register(acme, model=d.as_uri()), 422, fragment, "model")


@pytest.mark.parametrize("keys,fragment", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 0},
     "sliding_window=0"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
      "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
])
def test_option_the_runtime_lacks(acme, register, broken, keys, fragment):
    """A known architecture with an option the runtime does not implement fails at
    registration, not at its first cold start."""
    d = broken("option")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | keys))
    error_of(register(acme, model=d.as_uri()), 422, fragment, "model")


@pytest.mark.parametrize("victim,fragment", [
    ("config.json", "config.json is missing"),
    ("model.safetensors", "no model.safetensors"),
    ("tokenizer.json", "tokenizer.json is missing"),
])
def test_missing_files(acme, register, broken, victim, fragment):
    d = broken(victim.split(".")[0])
    (d / victim).unlink()
    error_of(register(acme, model=d.as_uri()), 422, fragment, "model")


def test_corrupt_config(acme, register, broken):
    d = broken("cfg")
    (d / "config.json").write_text("{not json")
    error_of(register(acme, model=d.as_uri()), 422, "not valid JSON", "model")


def test_truncated_safetensors_header(acme, register, broken):
    d = broken("header")
    raw = (d / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    (d / "model.safetensors").write_bytes(raw[: 8 + header_len // 2])
    error_of(register(acme, model=d.as_uri()), 422, "header length", "model")


def test_truncated_tensor_data(acme, register, broken):
    d = broken("data")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:-1000])
    error_of(register(acme, model=d.as_uri()), 422, "truncated", "model")


def test_header_that_is_not_json(acme, register, broken):
    d = broken("garbage")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{x" + b"\0" * 64)
    error_of(register(acme, model=d.as_uri()), 422, "not valid JSON", "model")


@pytest.mark.parametrize("model,fragment", [
    ("s3://bucket/x", "allowed schemes"),
    ("file:///etc", "outside the model store"),
    ("file:///tmp/../etc", "outside the model store"),
    ("http://", "has no host"),
    ("http://169.254.169.254/latest", "not an allowed model store"),
    ("https://models.example.com/llama", "not an allowed model store"),
])
def test_model_uri_rejected_before_reading(acme, register, model, fragment):
    error_of(register(acme, model=model), 400, fragment, "model")


def test_nonexistent_model_directory(acme, register, store_root):
    error_of(register(acme, model=(store_root / "nope").as_uri()), 422, "does not exist", "model")


@pytest.mark.parametrize("slo,param,fragment", [
    ({"ttft_ms": 10, "tpot_ms": 200}, "slo.ttft_ms", "greater than or equal to 50"),
    ({"ttft_ms": 5000, "tpot_ms": 0}, "slo.tpot_ms", "greater than or equal to 1"),
    ({"ttft_ms": 10**9, "tpot_ms": 200}, "slo.ttft_ms", "less than or equal to 600000"),
    ({"ttft_ms": "fast", "tpot_ms": 200}, "slo.ttft_ms", "valid integer"),
    ({"tpot_ms": 200}, "slo.ttft_ms", "Field required"),
])
def test_slo_out_of_range(client, acme, llama_uri, slo, param, fragment):
    resp = client.put("/v1/functions/fn", json={"model": llama_uri, "slo": slo}, headers=acme)
    error_of(resp, 400, fragment, param)


def test_min_above_max_instances(client, acme, register):
    err = error_of(register(acme, min_instances=5, max_instances=2), 400, "min_instances (5)")
    assert "max_instances (2)" in err["message"]
    register(acme, "ok")
    resp = client.patch("/v1/functions/ok", json={"min_instances": 9}, headers=acme)
    error_of(resp, 400, "must not exceed", "min_instances")


def test_unknown_field_is_named(client, acme, llama_uri):
    body = {"model": llama_uri, "slo": {"ttft_ms": 5000, "tpot_ms": 200}, "keepalive": 3}
    error_of(client.put("/v1/functions/fn", json=body, headers=acme), 400, "keepalive", "keepalive")


def test_duplicate_name(client, acme, register):
    assert register(acme, "dup").status_code == 201
    err = error_of(register(acme, "dup"), 409, "already exists", "name")
    assert "PATCH" in err["message"]


@pytest.mark.parametrize("body,fragment", [
    ("{bad", "not valid JSON"),
    ("", "body is empty"),
    ("[1, 2]", "must be a JSON object"),
    ('"text"', "must be a JSON object"),
])
def test_malformed_json(client, acme, body, fragment):
    resp = client.put("/v1/functions/fn", data=body, headers=acme, content_type="application/json")
    error_of(resp, 400, fragment)


def test_wrong_content_type(client, acme, llama_uri):
    resp = client.put("/v1/functions/fn", data="model=x", headers=acme,
                      content_type="application/x-www-form-urlencoded")
    error_of(resp, 415, "application/json")


@pytest.mark.parametrize("headers,fragment", [
    ({}, "missing API key"),
    ({"Authorization": "Bearer hs_wrong"}, "invalid API key"),
    ({"Authorization": "Basic abc"}, "malformed Authorization"),
    ({"Authorization": "Bearer "}, "malformed Authorization"),
])
def test_missing_or_wrong_key(client, headers, fragment):
    err = error_of(client.get("/v1/functions", headers=headers), 401, fragment)
    assert err["type"] == "authentication_error"


def test_revoked_key_stops_working(client, admin, acme):
    keys = client.get("/v1/admin/tenants/acme/keys", headers=admin).json["data"]
    assert client.delete(f"/v1/admin/keys/{keys[0]['id']}", headers=admin).status_code == 200
    error_of(client.get("/v1/functions", headers=acme), 401, "invalid API key")


def test_invalid_function_name(client, acme, register):
    err = error_of(register(acme, "Bad Name!"), 400, "not a valid name", "name")
    assert "lower-case" in err["message"]


def test_patch_errors(client, acme, register):
    register(acme, "fn")
    error_of(client.patch("/v1/functions/fn", json={}, headers=acme), 400, "changes nothing")
    error_of(client.patch("/v1/functions/fn", json={"alias": 7}, headers=acme), 400,
             "version 7 does not exist", "alias")
    error_of(client.patch("/v1/functions/fn", json={"alias": 1, "keep_alive_s": 3}, headers=acme),
             400, "either 'alias'")


def test_bad_paging(client, acme):
    error_of(client.get("/v1/functions?limit=0", headers=acme), 400, "out of range", "limit")
    error_of(client.get("/v1/functions?offset=x", headers=acme), 400, "not an integer", "offset")


def test_unknown_route_and_method(client, acme):
    err = error_of(client.get("/v1/nothing", headers=acme), 404, "not found")
    assert err["type"] == "not_found_error"
    resp = client.post("/v1/functions/fn", headers=acme)
    error_of(resp, 405, "not allowed")
    assert "PUT" in resp.headers["Allow"]


def test_an_unreachable_database_is_a_503_to_retry_not_a_500(settings):
    from dataclasses import replace

    from hydraserve.api.app import create_app

    down = replace(settings, admin_key=None,
                   database_url="postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    client = create_app(down).test_client()
    resp = client.get("/v1/functions", headers={"Authorization": "Bearer hs_some-key"})
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert resp.json["error"] == {"type": "service_unavailable", "param": None,
                                  "message": "the database is unavailable; retry shortly"}
