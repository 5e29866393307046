"""Stage 0's request loop, the parts that run without an engine: a crash leaves its cause in
the instance row, and error messages quote at most a short prefix."""

from __future__ import annotations

from types import SimpleNamespace

from sqlalchemy import select

from hydraserve.cluster import service as cluster
from hydraserve.cluster.models import ERROR_CHARS, Device, Instance
from hydraserve.cluster.service import DeviceSpec, StageRecord
from hydraserve.functions.models import Function, FunctionVersion
from hydraserve.tasks.node.request_loop import describe, record_crash


def an_instance(db_session, acme, register, name: str = "fn") -> Instance:
    assert register(acme, name).status_code == 201
    fn = db_session.scalars(select(Function).where(Function.name == name)).one()
    fv = db_session.scalars(select(FunctionVersion).where(
        FunctionVersion.function_id == fn.id)).one()
    cluster.register(db_session, "n1", "127.0.0.1", None, [DeviceSpec(0, "cpu", 1 << 30)], {})
    device_id = db_session.scalars(select(Device.id).where(Device.node_id == "n1")).one()
    (inst,) = cluster.record_group(db_session, fv, 1, [StageRecord(0, "n1", device_id, 1 << 20,
                                                                   True, 0, 1.0)], "test", 1, 1)
    return inst


def crash() -> Exception:
    def deep() -> None:
        raise RuntimeError("the broker went away " + "x" * 2000)

    try:
        deep()
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")


def test_a_crash_of_the_loop_records_its_cause_and_where_it_broke(db_session, session_factory,
                                                                  acme, register):
    inst = an_instance(db_session, acme, register)
    p = SimpleNamespace(sessions=session_factory, assignment=SimpleNamespace(instance_id=inst.id))
    record_crash(p, crash())
    db_session.expire_all()
    row = db_session.get(Instance, inst.id)
    assert row.status == "failed"
    assert row.error.startswith("request loop died: RuntimeError: the broker went away")
    assert "in deep" in row.error and len(row.error) <= ERROR_CHARS


def test_describe_quotes_a_short_prefix():
    text = describe(ValueError("y" * 1000), limit=20)
    assert text == "ValueError: " + "y" * 20 + "..."
    assert describe(KeyError("k")) == "KeyError: 'k'"
