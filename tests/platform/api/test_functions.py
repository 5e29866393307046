"""The function registry over REST: life cycle, versions and alias, tenant isolation."""

from __future__ import annotations

import pytest


def test_register_with_minimal_body_fills_defaults(client, acme, register):
    resp = register(acme, "chat")
    assert resp.status_code == 201, resp.json
    fn = resp.json
    assert (fn["name"], fn["tenant"], fn["alias_version"], fn["versions"]) == ("chat", "acme", 1, [1])
    spec = fn["spec"]
    assert spec["slo"] == {"ttft_ms": 5000, "tpot_ms": 200}
    assert (spec["keep_alive_s"], spec["min_instances"], spec["max_instances"]) == (300, 0, 4)
    model = spec["model"]
    assert model["architecture"] == "LlamaForCausalLM" and model["dtype"] == "float32"
    assert model["num_tensors"] == 21  # tiny llama: embed + 2 x 9 + norm + lm_head
    assert model["total_bytes"] == model["num_parameters"] * 4


def test_registration_stores_tensor_index_with_checksums(client, acme, register, db_session):
    from hydraserve.functions.models import Model

    assert register(acme, "chat").status_code == 201
    model = db_session.query(Model).one()
    first = model.tensors[0]
    assert set(first) == {"name", "dtype", "shape", "file", "offset", "length", "crc32"}
    assert all(isinstance(t["crc32"], int) for t in model.tensors)
    assert sum(t["length"] for t in model.tensors) == model.total_bytes
    assert list(model.file_sha256) == ["model.safetensors"]
    assert len(model.file_sha256["model.safetensors"]) == 64
    assert first["offset"] >= 8  # after the 8-byte length and the JSON header


def test_sharded_checkpoint_indexes_every_file(client, acme, register, store_root, db_session):
    from hydraserve.functions.models import Model

    resp = register(acme, "sharded", model=(store_root / "llama-sharded").as_uri())
    assert resp.status_code == 201, resp.json
    model = db_session.query(Model).one()
    files = {t["file"] for t in model.tensors}
    assert len(files) > 1 and files == set(model.file_sha256) == set(model.file_sizes)


def test_opt_is_accepted(client, acme, register, store_root):
    resp = register(acme, "opt", model=(store_root / "opt-tiny").as_uri())
    assert resp.status_code == 201, resp.json
    assert resp.json["spec"]["model"]["architecture"] == "OPTForCausalLM"


@pytest.mark.parametrize("arch,name", [("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
                                       ("mistral", "MistralForCausalLM")])
def test_llama_like_architectures_are_accepted(client, acme, register, store_root, arch, name):
    from gpu_runtime.demo_model import DemoModelSpec, make_demo_model

    model_dir = store_root / f"{arch}-tiny"
    if not model_dir.exists():
        make_demo_model(model_dir, DemoModelSpec(arch=arch, size="tiny"))
    resp = register(acme, arch, model=model_dir.as_uri())
    assert resp.status_code == 201, resp.json
    model = resp.json["spec"]["model"]
    assert model["architecture"] == name
    # tiny: embed + 2 layers x (9 + Qwen2's 3 q/k/v biases or Qwen3's 2 q/k norms) + norm, tied
    # (Qwen) or with lm_head (Mistral)
    assert model["num_tensors"] == {"qwen2": 26, "qwen3": 24, "mistral": 21}[arch], model


def test_same_checkpoint_is_indexed_once(client, acme, register, db_session):
    from hydraserve.functions.models import Model

    assert register(acme, "a").status_code == 201
    assert register(acme, "b").status_code == 201
    assert db_session.query(Model).count() == 1


def test_get_list_delete(client, acme, register):
    register(acme, "b-fn")
    register(acme, "a-fn")
    listed = client.get("/v1/functions", headers=acme).json
    assert [f["name"] for f in listed["data"]] == ["a-fn", "b-fn"]
    assert client.get("/v1/functions?limit=1&offset=1", headers=acme).json["data"][0]["name"] == "b-fn"
    assert client.get("/v1/functions/a-fn", headers=acme).json["name"] == "a-fn"
    resp = client.delete("/v1/functions/a-fn", headers=acme)
    assert resp.status_code == 200 and resp.json == {"object": "function", "name": "a-fn",
                                                     "deleted": True}
    assert client.get("/v1/functions/a-fn", headers=acme).status_code == 404
    assert [f["name"] for f in client.get("/v1/functions", headers=acme).json["data"]] == ["b-fn"]
    assert register(acme, "a-fn").status_code == 201  # a deleted name can be reused


def test_patch_makes_an_immutable_new_version(client, acme, register):
    register(acme, "fn")
    resp = client.patch("/v1/functions/fn", json={"slo": {"tpot_ms": 50}, "keep_alive_s": 10},
                        headers=acme)
    assert resp.status_code == 200, resp.json
    fn = resp.json
    assert (fn["alias_version"], fn["latest_version"], fn["versions"]) == (2, 2, [1, 2])
    assert fn["spec"]["slo"] == {"ttft_ms": 5000, "tpot_ms": 50}
    assert fn["spec"]["keep_alive_s"] == 10
    back = client.patch("/v1/functions/fn", json={"alias": 1}, headers=acme).json
    assert back["alias_version"] == 1 and back["latest_version"] == 2
    assert back["spec"]["slo"]["tpot_ms"] == 200 and back["spec"]["keep_alive_s"] == 300


def test_tenants_never_see_each_other(client, make_tenant, register):
    acme, umbrella = make_tenant("acme"), make_tenant("umbrella")
    assert register(acme, "secret").status_code == 201
    assert client.get("/v1/functions", headers=umbrella).json["data"] == []
    for method in ("get", "delete"):
        resp = getattr(client, method)("/v1/functions/secret", headers=umbrella)
        assert resp.status_code == 404 and resp.json["error"]["type"] == "not_found_error"
    resp = client.patch("/v1/functions/secret", json={"keep_alive_s": 1}, headers=umbrella)
    assert resp.status_code == 404
    # the same name is free in another tenant, and the first tenant's function is untouched
    assert register(umbrella, "secret").status_code == 201
    assert client.get("/v1/functions/secret", headers=acme).json["tenant"] == "acme"
