"""The typed hand-off of stage 0 to its caller's request loop: a wrong wiring fails when the plan
is made (or the pool configured), with a message naming what is wrong."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from gpu_runtime.coldstart import AssignmentError, StageServer, WorkerPoolConfig, plan_group
from tests.gpu_runtime.coldstart.hooks import RecordingServer


@dataclass(frozen=True)
class NoServe:
    def prepare(self) -> None:
        return None


@dataclass(frozen=True)
class WrongServe:
    def prepare(self) -> None:
        return None

    def serve(self, engine) -> None:  # too few parameters
        return None


@dataclass(frozen=True)
class Unpicklable:
    callback: object

    def prepare(self) -> None:
        return None

    def serve(self, engine, report, prepared, control=None) -> None:
        return None


@pytest.fixture
def plans(cs_index):
    return plan_group("llama", cs_index["llama"], 2, kv_cache_bytes=4 << 20,
                      addresses=["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"])


def test_a_stage_server_is_accepted_on_stage_0(plans):
    server = RecordingServer("/tmp/out.json")
    assert isinstance(server, StageServer)
    assert replace(plans[0], server=server).server is server


def test_a_server_without_serve_fails_at_plan_time_with_what_is_missing(plans):
    with pytest.raises(AssignmentError, match=r"NoServe lacks \['serve'\]") as info:
        replace(plans[0], server=NoServe())
    assert info.value.param == "server"


def test_a_server_whose_serve_has_the_wrong_signature_fails_at_plan_time(plans):
    with pytest.raises(AssignmentError, match="WrongServe.serve cannot be called"):
        replace(plans[0], server=WrongServe())


def test_a_server_that_cannot_travel_to_a_worker_fails_at_plan_time(plans):
    with pytest.raises(AssignmentError, match="cannot be sent to a worker process"):
        replace(plans[0], server=Unpicklable(lambda: None))


def test_only_stage_0_takes_a_server(plans):
    with pytest.raises(AssignmentError, match="stage 1 got a stage server"):
        replace(plans[1], server=RecordingServer("/tmp/out.json"))


def test_pool_preload_takes_server_classes_only():
    assert WorkerPoolConfig(preload=(RecordingServer,)).preload == (RecordingServer,)
    with pytest.raises(AssignmentError, match="is not a class implementing"):
        WorkerPoolConfig(preload=("tests.gpu_runtime.coldstart.hooks",))
    with pytest.raises(AssignmentError, match="is not a class implementing"):
        WorkerPoolConfig(preload=(NoServe,))
