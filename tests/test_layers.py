"""Layers keep their direction, read from the imports of every module (function-level imports
included): api -> domain services and schemas -> models; nothing outside ``api/`` imports Flask;
the data plane imports nothing of the platform."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DOMAINS = ("functions", "invocations", "tenants", "cluster", "billing", "console")
SHARED = ("db", "errors", "settings", "broker", "validation", "models", "metrics")
WEB = ("flask", "werkzeug")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. hydraserve.api.views.functions
    target: str  # what it imports, e.g. hydraserve.functions.service
    where: str  # path:line

    def __str__(self) -> str:
        return f"{self.where}: {self.module} imports {self.target}"


def module_name(path: Path) -> str:
    if path.is_relative_to(REPO_ROOT / "platform"):
        parts = ["hydraserve", *path.relative_to(REPO_ROOT / "platform").with_suffix("").parts]
    else:
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[Import]:
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # "from pkg import mod" imports pkg.mod when mod is a module; count both
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
        out += [Import(module, t, where) for t in targets]
    return out


def all_imports(folder: str) -> list[Import]:
    return [i for p in sorted((REPO_ROOT / folder).rglob("*.py")) for i in imports_of(p)]


PLATFORM = all_imports("platform")
RUNTIME = all_imports("gpu_runtime")


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def hs(*names: str) -> tuple[str, ...]:
    return tuple(f"hydraserve.{n}" for n in names)


def known(target: str) -> bool:
    """Only imports of real hydraserve modules count ("from pkg import name" also yields
    pkg.name for plain names; those are not modules)."""
    rel = target.removeprefix("hydraserve.").replace(".", "/")
    return (REPO_ROOT / "platform" / f"{rel}.py").exists() or (
        REPO_ROOT / "platform" / rel / "__init__.py").exists() or target == "hydraserve"


def violations(imports: list[Import], importer: tuple[str, ...], banned: tuple[str, ...],
               allowed: tuple[str, ...] = ()) -> list[str]:
    return [str(i) for i in imports
            if within(i.module, *importer) and within(i.target, *banned)
            and not within(i.target, *allowed)
            and (not i.target.startswith("hydraserve") or known(i.target))]


def test_the_reader_sees_imports_it_must_see():
    # guards the rules below against passing because nothing was read
    targets = {(i.module, i.target) for i in PLATFORM}
    assert ("hydraserve.api.views.functions", "flask") in targets
    assert ("hydraserve.api.views.functions", "hydraserve.functions.service") in targets
    assert ("hydraserve.scheduler.loop", "hydraserve.tasks.celery_app") in targets  # lazy import
    assert any(i.target == "torch" for i in RUNTIME)


def test_only_the_api_imports_flask():
    outside = [i for i in PLATFORM + RUNTIME if not within(i.module, "hydraserve.api")]
    assert violations(outside, ("hydraserve", "gpu_runtime"), WEB) == []


def test_the_data_plane_imports_nothing_of_the_platform_nor_its_services():
    banned = ("hydraserve", "flask", "werkzeug", "sqlalchemy", "psycopg", "alembic", "celery",
              "kombu", "pika")
    assert violations(RUNTIME, ("gpu_runtime",), banned) == []


@pytest.mark.parametrize("domain", DOMAINS + SHARED)
def test_domains_and_shared_modules_import_no_outer_layer(domain):
    outer = hs("api", "scheduler", "tasks", "cli", "devcluster")
    assert violations(PLATFORM, hs(domain), outer) == []


@pytest.mark.parametrize("domain", DOMAINS)
def test_models_import_only_the_base_and_other_models(domain):
    allowed = ("hydraserve.db", *(f"hydraserve.{d}.models" for d in DOMAINS))
    assert violations(PLATFORM, hs(f"{domain}.models"), ("hydraserve",), allowed) == []


def test_the_api_calls_services_and_schemas_not_models_or_other_layers():
    banned = (*hs("scheduler", "tasks", "cli", "devcluster", "models", "db"),
              *(f"hydraserve.{d}.models" for d in DOMAINS))
    # the app factory builds the engine and session factory; views go through services
    views = [i for i in PLATFORM if within(i.module, "hydraserve.api.views")]
    assert violations(views, hs("api.views"), banned) == []
    assert violations(PLATFORM, hs("api"), hs("scheduler", "tasks", "cli", "devcluster")) == []


def test_the_scheduler_sends_node_tasks_but_imports_no_api_or_node_code():
    assert violations(PLATFORM, hs("scheduler"), hs("api", "cli", "tasks"),
                      hs("tasks.celery_app")) == []


def test_node_code_and_tasks_import_no_api_or_scheduler():
    assert violations(PLATFORM, hs("tasks"), hs("api", "scheduler", "cli", "devcluster")) == []
