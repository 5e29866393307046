"""``hydraserve admin set-limits``, its sessions on the test's transaction (nothing committed to
the shared test database for the next test to find)."""

from __future__ import annotations

import importlib
import uuid

from click.testing import CliRunner

from hydraserve.cli import main


def test_set_limits_prints_them_all_and_refuses_nothing_to_set(session_factory, monkeypatch):
    # the module, not the click group of the same name that hydraserve.cli exports
    monkeypatch.setattr(importlib.import_module("hydraserve.cli.admin"), "session", session_factory)
    name = f"cli-{uuid.uuid4().hex[:8]}"
    runner = CliRunner()
    assert runner.invoke(main, ["admin", "create-tenant", name]).exit_code == 0
    out = runner.invoke(main, ["admin", "set-limits", name, "--max-concurrency", "7",
                               "--tokens-per-minute", "900"])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines() == ["max_concurrency: 7", "max_queued: 1024",
                                       "requests_per_minute: 6000", "tokens_per_minute: 900"]
    none = runner.invoke(main, ["admin", "set-limits", name])
    assert none.exit_code != 0 and "give at least one limit" in none.output
    ghost = runner.invoke(main, ["admin", "set-limits", "ghost-tenant", "--max-queued", "2"])
    assert ghost.exit_code != 0 and "not found" in ghost.output
