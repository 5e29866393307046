"""Shared fixtures: a throwaway Postgres database migrated once per session, a transaction per
test that is rolled back, and small random checkpoints in a model store directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from gpu_runtime.demo_model import DemoModelSpec, make_demo_model

# Triton decides when it is imported whether it interprets kernels: a run without CUDA
# interprets (the CUDA decode kernel's tests run on CPU tensors), a run with CUDA compiles.
# Set before any test imports it; workers and subprocesses inherit it.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_SERVER = os.environ.get("HYDRA_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
ADMIN_KEY = "test-admin-key-0123456789"


def fresh_database_url(tag: str) -> str:
    from hydraserve.cli.db import create_database

    url = f"{PG_SERVER}/hydraserve_test_{tag}_{uuid.uuid4().hex[:8]}"
    create_database(url)
    return url


@pytest.fixture(scope="session")
def database_url():
    from hydraserve.cli.db import drop_database, upgrade

    url = fresh_database_url("s")
    upgrade(url)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def engine(database_url):
    from hydraserve.db import make_engine

    eng = make_engine(database_url)  # as the platform's processes make theirs
    yield eng
    eng.dispose()


@pytest.fixture
def connection(engine):
    with engine.connect() as conn:
        outer = conn.begin()
        yield conn
        outer.rollback()


@pytest.fixture
def session_factory(connection):
    """Sessions whose commits become savepoints inside the test's rolled-back transaction."""

    def factory() -> Session:
        return Session(bind=connection, join_transaction_mode="create_savepoint",
                       expire_on_commit=False)

    return factory


@pytest.fixture
def db_session(session_factory):
    with session_factory() as s:
        yield s


@pytest.fixture(scope="session")
def store_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    make_demo_model(root / "llama-tiny", DemoModelSpec(arch="llama", size="tiny"))
    make_demo_model(root / "opt-tiny", DemoModelSpec(arch="opt", size="tiny"))
    make_demo_model(root / "llama-small", DemoModelSpec(arch="llama", size="small", seed=2))
    make_demo_model(root / "llama-sharded", DemoModelSpec(arch="llama", size="tiny",
                                                          shard_bytes=100_000, seed=1))
    return root


@pytest.fixture
def settings(database_url, store_root):
    from hydraserve.settings import Settings

    return Settings(database_url=database_url, store_root=str(store_root), admin_key=ADMIN_KEY)


@pytest.fixture(scope="session")
def no_template_model(store_root) -> Path:
    """The tiny Llama without a chat template (``messages`` cannot be rendered for it)."""
    import json
    import shutil

    model = store_root / "llama-no-template"
    if not model.exists():
        shutil.copytree(store_root / "llama-tiny", model)
        cfg = json.loads((model / "tokenizer_config.json").read_text())
        del cfg["chat_template"]
        (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    return model


PROMTOOL = shutil.which("promtool")  # Debian's prometheus package (make venv installs it)


def promtool_problems(text: str) -> list[str]:
    """What ``promtool check metrics`` reports of an exposition, less one rule: vLLM's metric
    names contain ':' (``vllm:...``), which the serving metrics keep on purpose so dashboards
    made for vLLM work (docs/metrics.md); promtool lints every such name."""
    assert PROMTOOL, "promtool is not installed"
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    problems = [line for line in lines if not (
        line.startswith("vllm:") and line.endswith("metric names should not contain ':'"))]
    assert problems or out.returncode in (0, 3), (out.returncode, lines)  # 3: lint findings
    return problems
