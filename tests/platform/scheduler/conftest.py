"""Scheduler fixtures: a scheduler on the test's rolled-back transaction whose node tasks are
recorded instead of sent, and functions registered over the API."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
from kombu.exceptions import OperationalError
from sqlalchemy import select

from hydraserve.functions.models import Function, FunctionVersion
from hydraserve.scheduler.loop import Scheduler


class Recorder:
    """A ``Sender`` that records the node tasks instead of sending them."""

    def __init__(self) -> None:
        self.sent: list[tuple] = []
        self.broker_down = False  # every send raises, as Celery does without a broker

    def start_stage(self, node_id: str, instance_id: int) -> None:
        self.sent.append(("start", node_id, instance_id))

    def consolidate(self, node_id: str, instance_id: int) -> None:
        if self.broker_down:
            raise OperationalError("[Errno 111] Connection refused")
        self.sent.append(("consolidate", node_id, instance_id))

    def stop_stage(self, node_id: str, instance_id: int, kill: bool = False) -> None:
        if self.broker_down:
            raise OperationalError("[Errno 111] Connection refused")
        self.sent.append(("stop", node_id, instance_id, kill))

    def take(self) -> list[tuple]:
        out, self.sent = self.sent, []
        return out


@pytest.fixture
def settings(settings):
    return replace(settings, queue_prefix=f"d{uuid.uuid4().hex[:8]}.", max_queue_s=30)


@pytest.fixture
def sender() -> Recorder:
    return Recorder()


@pytest.fixture
def sched(settings, session_factory, sender) -> Scheduler:
    return Scheduler(settings, sender=sender, sessions=session_factory,
                     heartbeat_timeout_s=10, start_timeout_s=60)


@pytest.fixture
def s(db_session):
    """The test's own session; ``read`` expires it so it sees what the scheduler committed."""
    return db_session


@pytest.fixture
def function(acme, register, s):
    """Registers a function over the API and returns its alias version."""

    def make(name: str = "fn", **extra) -> FunctionVersion:
        resp = register(acme, name, **extra)
        assert resp.status_code == 201, resp.json
        fn = s.scalars(select(Function).where(Function.name == name,
                                              Function.deleted_at.is_(None))).one()
        return s.scalars(select(FunctionVersion).where(
            FunctionVersion.function_id == fn.id,
            FunctionVersion.version == fn.alias_version)).one()

    return make
