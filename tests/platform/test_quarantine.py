"""Requests that kill workers (invocations/quarantine.py) against real Postgres: the suspects of
a death, the quarantine, the marker file a worker leaves, and the node agent acting on it only
for deaths it did not cause."""

from __future__ import annotations

import uuid
from dataclasses import replace
from types import SimpleNamespace

import pytest

from hydraserve.cluster.models import Instance
from hydraserve.invocations import quarantine
from hydraserve.invocations.models import Invocation
from hydraserve.tasks.node import prefill_marker
from hydraserve.tasks.node.agent import NodeAgent
from tests.platform.test_request_loop import an_instance


@pytest.fixture
def settings(settings):
    return replace(settings, queue_prefix=f"q{uuid.uuid4().hex[:8]}.", sync_deadline_s=0)


def rows(db_session, ids: list[str]) -> list[Invocation]:
    db_session.expire_all()
    return [db_session.get(Invocation, i) for i in ids]


def test_a_request_prefilled_alone_when_its_worker_died_is_quarantined(db_session, queued):
    (a,) = queued(1)
    assert quarantine.worker_died(db_session, [a], 17, "worker process exited with code -6") == [a]
    (row,) = rows(db_session, [a])
    assert row.status == "failed" and row.finished_at is not None and row.worker_deaths == 1
    assert row.error["type"] == "internal_error"
    assert row.error["message"].startswith("quarantined: the worker serving it (instance 17)")
    assert "exited with code -6" in row.error["message"]


def test_several_suspects_each_count_the_death_and_a_second_one_quarantines(db_session, queued):
    a, b, c = queued(3)
    assert quarantine.worker_died(db_session, [a, b], 3, "exited with code -9") == []
    assert [(r.status, r.worker_deaths) for r in rows(db_session, [a, b, c])] == [
        ("queued", 1), ("queued", 1), ("queued", 0)]
    # a suspect of the first death, again among several: this time it is quarantined
    assert quarantine.worker_died(db_session, [a, c], 4, "exited with code -9") == [a]
    assert [(r.status, r.worker_deaths) for r in rows(db_session, [a, b, c])] == [
        ("failed", 2), ("queued", 1), ("queued", 1)]


def test_finished_requests_are_left_as_they_are(db_session, queued):
    (a,) = queued(1)
    db_session.get(Invocation, a).status = "succeeded"
    db_session.commit()
    assert quarantine.worker_died(db_session, [a], 5, "exited with code -6") == []
    assert quarantine.worker_died(db_session, [], 5, "exited with code -6") == []
    assert rows(db_session, [a])[0].status == "succeeded"


def test_the_marker_file_holds_what_is_being_prefilled(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_LOG_DIR", str(tmp_path))
    path = prefill_marker.marker_path("pre.", 9)
    assert path == tmp_path / "pre.prefilling-9"
    marker = prefill_marker.PrefillMarker(path)
    marker.mark(("inv_a", "inv_b"))
    assert prefill_marker.take(path) == ["inv_a", "inv_b"] and not path.exists()
    marker.mark(("inv_a", "inv_b"))  # unchanged since the last write: not rewritten
    assert not path.exists()
    marker.mark(("inv_c",))
    marker.clear()
    assert prefill_marker.take(path) == []
    path.write_text("inv_x\ngarbage\n")  # a write cut short by the death leaves a fragment
    assert prefill_marker.take(path) == ["inv_x"]


@pytest.fixture
def agent(settings, session_factory, tmp_path, monkeypatch) -> NodeAgent:
    monkeypatch.setenv("HYDRA_LOG_DIR", str(tmp_path))
    node = NodeAgent(settings, "n1", [], loader="files")
    node.sessions = session_factory  # inside the test's transaction
    return node


@pytest.fixture
def prefilling(agent, db_session, acme, register, queued):
    """An instance whose worker left a marker naming one queued invocation:
    (instance, invocation id, marker path)."""
    inst = an_instance(db_session, acme, register, "other")
    (a,) = queued(1)
    path = prefill_marker.marker_path(agent.settings.queue_prefix, inst.id)
    path.write_text(a)
    return inst, a, path


def test_the_agent_quarantines_what_a_dead_worker_was_prefilling(agent, db_session, prefilling):
    inst, a, path = prefilling
    agent._reap(inst.id, SimpleNamespace(returncode=-6, pid=123456))
    db_session.expire_all()
    assert db_session.get(Instance, inst.id).status == "failed"
    (row,) = rows(db_session, [a])
    assert row.status == "failed" and "exited with code -6" in row.error["message"]
    assert not path.exists()


def test_a_worker_the_agent_stopped_or_killed_makes_no_suspects(agent, db_session, prefilling):
    inst, a, path = prefilling
    agent.signalled.add(inst.id)  # as stop_stage and the closed-instance reconcile do
    agent._reap(inst.id, SimpleNamespace(returncode=-9, pid=123457))
    (row,) = rows(db_session, [a])
    assert (row.status, row.worker_deaths) == ("queued", 0)
    assert not path.exists() and inst.id not in agent.signalled
