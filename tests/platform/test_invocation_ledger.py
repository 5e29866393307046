"""The request ledger (stage 0's per-request writes) against real Postgres: claiming (attempt cap, cold or
warm, redelivery), recording a batch in one statement (a cancel that came first wins), and the
row the ``done`` event carries back to the API."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text

from hydraserve.db import utcnow
from hydraserve.invocations import ledger
from hydraserve.invocations.models import Invocation
from hydraserve.invocations.replies import detached
from hydraserve.invocations.schemas import invocation_out
from hydraserve.tasks.node.request_loop import jsonable


@pytest.fixture
def settings(settings):
    return replace(settings, queue_prefix=f"l{uuid.uuid4().hex[:8]}.", sync_deadline_s=0)


def row(connection, inv_id: str) -> Invocation:
    return connection.execute(Invocation.__table__.select().where(Invocation.id == inv_id)).one()


def test_begin_claims_warm_requests_once_per_delivery(connection, queued):
    a, b = queued(2)
    claimed = ledger.begin(connection, [a, b], (7, 8), utcnow() - timedelta(hours=1))
    assert claimed == {a: 0, b: 0}  # each with the worker deaths it is a suspect of
    r = row(connection, a)
    assert (r.status, r.attempts, r.instance_ids, r.cold) == ("running", 1, [7, 8], False)
    assert r.loaded_at is None and r.planned_at is None
    assert set(ledger.begin(connection, [a], (9,), utcnow() - timedelta(hours=1))) == {a}
    assert row(connection, a).attempts == 2 and row(connection, a).instance_ids == [9]


def test_begin_marks_requests_queued_before_the_group_was_ready_cold(connection, queued):
    (a,) = queued(1)
    ready_at = utcnow() + timedelta(seconds=1)
    assert set(ledger.begin(connection, [a], (1,), ready_at)) == {a}
    r = row(connection, a)
    assert r.cold is True and r.loaded_at == ready_at


def test_begin_fails_a_request_out_of_attempts_and_skips_finished_ones(connection, queued):
    a, b = queued(2)
    connection.execute(text("UPDATE invocations SET attempts = :n WHERE id = :id"),
                       {"n": ledger.MAX_ATTEMPTS, "id": a})
    connection.execute(text("UPDATE invocations SET status = 'succeeded' WHERE id = :id"),
                       {"id": b})
    assert ledger.begin(connection, [a, b], (1,), utcnow()) == {}
    r = row(connection, a)
    assert r.status == "failed" and r.attempts == ledger.MAX_ATTEMPTS + 1
    assert r.error["type"] == "service_unavailable" and "3 attempts" in r.error["message"]
    assert r.finished_at is not None
    assert row(connection, b).attempts == 0  # a finished request is not touched


def test_complete_records_a_batch_in_one_statement_and_keeps_a_cancel(connection, queued):
    a, b, c = queued(3)
    ledger.begin(connection, [a, b, c], (4,), utcnow() - timedelta(hours=1))
    connection.execute(text("UPDATE invocations SET status = 'cancelled' WHERE id = :id"),
                       {"id": c})
    first = utcnow()
    outcomes = [ledger.Outcome(i, {"text": f"out {i}", "token_ids": [5, 6]}, 2, 2, first)
                for i in (a, b, c)]
    recorded = ledger.complete(connection, outcomes)
    assert set(recorded) == {a, b}
    for inv_id in (a, b):
        r = row(connection, inv_id)
        assert (r.status, r.output["text"], r.tokens_in, r.tokens_out) == (
            "succeeded", f"out {inv_id}", 2, 2)
        assert r.first_token_at == first and r.finished_at >= first
        assert recorded[inv_id]["finished_at"] == r.finished_at
    assert row(connection, c).status == "cancelled" and row(connection, c).output is None
    assert ledger.complete(connection, outcomes[:1]) == {}  # a redelivered finish: no change


def test_generated_nul_and_escape_characters_are_stored_and_read_back_losslessly(
        connection, db_session, queued):
    # Postgres jsonb refuses U+0000; a model that emits one must not fail the record
    a, b = queued(2)
    ledger.begin(connection, [a, b], (4,), utcnow() - timedelta(hours=1))
    texts = {a: "ok\x00then \x00\x00", b: "\ue000 leads, \ue0000 and \x00"}
    recorded = ledger.complete(connection, [
        ledger.Outcome(i, {"text": t, "token_ids": [0, 5]}, 2, 2, utcnow()) for i, t in texts.items()])
    assert {i: r["output"]["text"] for i, r in recorded.items()} == texts  # the done event's row
    for inv_id, want in texts.items():
        assert db_session.get(Invocation, inv_id).output["text"] == want  # the API's read
    stored = connection.execute(text("SELECT output->>'text' FROM invocations WHERE id = :id"),
                                {"id": a}).scalar()
    assert "\x00" not in stored
    ledger.fail(connection, b, "internal_error", "decoded \x00 here", None)  # errors too
    connection.execute(text("UPDATE invocations SET status = 'running' WHERE id = :id"), {"id": a})
    ledger.fail(connection, a, "internal_error", "decoded \x00 here", None)
    db_session.expire_all()
    assert db_session.get(Invocation, a).error["message"] == "decoded \x00 here"


def test_fail_and_cancelled(connection, queued):
    a, b = queued(2)
    ledger.fail(connection, a, "invalid_request_error", "prompt too long: 9 > 8", "prompt")
    r = row(connection, a)
    assert r.status == "failed" and r.error == {
        "type": "invalid_request_error", "message": "prompt too long: 9 > 8", "param": "prompt"}
    connection.execute(text("UPDATE invocations SET status = 'cancelled' WHERE id = :id"),
                       {"id": b})
    assert ledger.cancelled(connection, [a, b]) == {b}
    assert ledger.cancelled(connection, []) == set()


def test_the_done_event_row_renders_like_the_stored_one(connection, queued, db_session):
    (a,) = queued(1)
    ledger.begin(connection, [a], (3,), utcnow() - timedelta(hours=1))
    recorded = ledger.complete(connection, [ledger.Outcome(a, {"text": "hi"}, 2, 1, utcnow())])
    from_event = invocation_out(detached(jsonable(recorded[a])), "fn", 1)
    stored = invocation_out(db_session.get(Invocation, a), "fn", 1)
    assert from_event == stored and from_event.status == "succeeded"
    assert from_event.timings.ttft_ms is not None


def test_ledger_reconnects_once_when_postgres_drops_its_connection(database_url):
    engine = create_engine(database_url)
    kept = ledger.Ledger(engine)
    pid = kept.run(lambda conn: conn.scalar(text("SELECT pg_backend_pid()")))
    assert kept.run(lambda conn: conn.scalar(text("SELECT pg_backend_pid()"))) == pid  # kept
    with engine.connect() as other:
        other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    again = kept.run(lambda conn: conn.scalar(text("SELECT pg_backend_pid()")))
    assert again != pid
    kept.close()
    engine.dispose()


def test_ledger_waits_out_a_database_outage_then_gives_up(database_url):
    from sqlalchemy.exc import OperationalError

    now = [0.0]
    kept = ledger.Ledger(create_engine(database_url), clock=lambda: now[0],
                         sleep=lambda s: now.__setitem__(0, now[0] + s))
    calls = []

    def flaky(conn, down_for: float):
        calls.append(now[0])
        if now[0] < down_for:  # as while Postgres restarts
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("down"))
        return "written"

    assert kept.run(flaky, 3.0) == "written"
    assert calls[-1] >= 3.0 and len(calls) == 3.0 / ledger.Ledger.RETRY_S + 1
    calls.clear()
    with pytest.raises(OperationalError):  # down for longer than OUTAGE_S: the error stands
        kept.run(flaky, now[0] + ledger.Ledger.OUTAGE_S + 10)
    assert calls[-1] - calls[0] >= ledger.Ledger.OUTAGE_S
    kept.close()


def test_a_cold_request_claimed_before_the_fetch_end_was_written_gets_it_when_recorded(
        connection, queued):
    """Stage 0 may claim a cold request before its node agents have committed the fetch end;
    the fetch phase still reaches the TTFT breakdown (the record fills it in)."""
    (a,) = queued(1)
    version_id = row(connection, a).function_version_id
    connection.execute(text("INSERT INTO nodes (id, address, status, last_heartbeat_at, "
                            "registered_at, info) VALUES ('n-fetch', 'x', 'up', now(), now(), "
                            "'{}') ON CONFLICT DO NOTHING"))
    group = tuple(connection.execute(text(
        "INSERT INTO instances (function_version_id, node_id, stage_index, num_stages, "
        "memory_bytes, status, address, timeline, created_at) VALUES "
        "(:v, 'n-fetch', 0, 2, 1, 'ready', '', '{}', now()), "
        "(:v, 'n-fetch', 1, 2, 1, 'ready', '', '{}', now()) RETURNING id"),
        {"v": version_id}).scalars())
    ready_at = utcnow() + timedelta(seconds=1)
    ledger.begin(connection, [a], group, ready_at)
    assert row(connection, a).cold is True and row(connection, a).fetched_at is None
    fetch_end = utcnow().timestamp()
    for instance_id, end in zip(group, (fetch_end - 0.5, fetch_end), strict=True):
        connection.execute(text("UPDATE instances SET timeline = timeline || "
                                "jsonb_build_object('fetch_end', CAST(:end AS float)) "
                                "WHERE id = :id"), {"end": end, "id": instance_id})
    recorded = ledger.complete(connection, [ledger.Outcome(a, {"text": "x"}, 1, 1, utcnow())])
    fetched = row(connection, a).fetched_at
    assert fetched is not None and abs(fetched.timestamp() - fetch_end) < 1e-3  # the latest stage
    assert recorded[a]["fetched_at"] == fetched
    breakdown = invocation_out(detached(jsonable(recorded[a])), "fn", 1).timings.breakdown_ms
    assert "fetch" in breakdown  # the breakdown the client is sent


def test_a_warm_request_gets_no_fetch_phase_when_recorded(connection, queued):
    (a,) = queued(1)
    ledger.begin(connection, [a], (1,), utcnow() - timedelta(hours=1))
    ledger.complete(connection, [ledger.Outcome(a, {"text": "x"}, 1, 1, utcnow())])
    assert row(connection, a).fetched_at is None
