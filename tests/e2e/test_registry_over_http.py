"""The registry through gunicorn and the ``hydraserve`` CLI, as a user would drive it."""

from __future__ import annotations

import subprocess

import requests

from tests.e2e.conftest import BIN


def cli(env: dict, *args: str, base: str | None = None, key: str | None = None) -> str:
    extra = {"HYDRA_API_URL": base or "", "HYDRA_API_KEY": key or ""}
    out = subprocess.run([str(BIN / "hydraserve"), *args], env=env | extra, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_register_list_delete_with_tenant_isolation(api_server, e2e_env, store_root):
    key_a = cli(e2e_env, "admin", "create-tenant", "alpha").strip()
    key_b = cli(e2e_env, "admin", "create-tenant", "beta").strip()
    assert key_a.startswith("hs_") and key_a != key_b
    model = (store_root / "opt-tiny").as_uri()
    cli(e2e_env, "functions", "register", "chat", "--model", model, "--ttft-ms", "4000",
        "--tpot-ms", "150", base=api_server, key=key_a)
    listed = cli(e2e_env, "functions", "list", base=api_server, key=key_a)
    assert "chat" in listed and "OPTForCausalLM" in listed and "ttft 4000 ms" in listed
    assert cli(e2e_env, "functions", "list", base=api_server, key=key_b).strip() == ""

    other = requests.get(f"{api_server}/v1/functions/chat",
                         headers={"Authorization": f"Bearer {key_b}"}, timeout=10)
    assert other.status_code == 404 and other.json()["error"]["type"] == "not_found_error"
    cli(e2e_env, "functions", "delete", "chat", base=api_server, key=key_a)
    assert cli(e2e_env, "functions", "list", base=api_server, key=key_a).strip() == ""


def test_cli_reports_api_errors(api_server, e2e_env):
    key = cli(e2e_env, "admin", "create-tenant", "gamma").strip()
    out = subprocess.run(
        [str(BIN / "hydraserve"), "functions", "register", "x", "--model", "s3://b/m",
         "--ttft-ms", "4000", "--tpot-ms", "150"],
        env=e2e_env | {"HYDRA_API_URL": api_server, "HYDRA_API_KEY": key},
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "HTTP 400 invalid_request_error" in out.stderr and "allowed schemes" in out.stderr


def test_openapi_and_health_over_http(api_server):
    assert requests.get(f"{api_server}/healthz", timeout=10).json()["status"] == "ok"
    doc = requests.get(f"{api_server}/openapi.json", timeout=10).json()
    assert "/v1/functions/{name}" in doc["paths"]


def test_make_demo_model_cli(e2e_env, tmp_path):
    out = cli(e2e_env, "make-demo-model", str(tmp_path / "m"), "--arch", "opt", "--size", "tiny")
    assert "wrote opt/tiny/float32" in out
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
