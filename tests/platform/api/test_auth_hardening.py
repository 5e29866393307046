"""Keys cannot be guessed at speed, and neither keys nor prompts reach the logs."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

import pytest
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError

from hydraserve.db import make_engine
from hydraserve.tenants.guard import AuthFailures

SECRET_PROMPT = "the-secret-prompt-8f2c"


@pytest.fixture
def settings(settings):
    return replace(settings, queue_prefix=f"h{uuid.uuid4().hex[:8]}.", sync_deadline_s=0,
                   auth_failures_per_minute=5)


def bad_key(client, address: str, key: str = "hs_wrong_key_0123456789"):
    return client.get("/v1/functions", headers={"Authorization": f"Bearer {key}"},
                      environ_base={"REMOTE_ADDR": address})


def test_an_address_with_too_many_failures_is_refused_for_a_while(client, acme):
    assert [bad_key(client, "10.1.1.1").status_code for _ in range(5)] == [401] * 5
    refused = bad_key(client, "10.1.1.1")
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "too many failed authentications" in refused.json["error"]["message"]
    good_key = acme["Authorization"].removeprefix("Bearer ")
    assert bad_key(client, "10.1.1.1", good_key).status_code == 429  # that address waits
    assert bad_key(client, "10.2.2.2", good_key).status_code == 200  # others do not
    assert bad_key(client, "10.2.2.2").status_code == 401


def test_failures_leave_the_window_after_a_minute():
    now = [1000.0]
    guard = AuthFailures(2, clock=lambda: now[0])
    guard.failed("a")
    guard.failed("a")
    with pytest.raises(Exception, match="retry after 60 s"):
        guard.check("a")
    now[0] += 30
    with pytest.raises(Exception, match="retry after 30 s"):
        guard.check("a")
    now[0] += 31
    guard.check("a")  # both failures are older than a minute


def test_database_errors_do_not_list_the_statements_parameters(database_url):
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn, pytest.raises(DBAPIError) as info:
            conn.execute(text("SELECT CAST(:p AS integer), :q"), {"p": "1x", "q": SECRET_PROMPT})
        assert SECRET_PROMPT not in str(info.value)
        assert "SQL parameters hidden" in str(info.value)
    finally:
        engine.dispose()


def test_a_failing_invocation_logs_neither_its_key_nor_its_prompt(client, acme, register,
                                                                   monkeypatch, caplog):
    from hydraserve.invocations import service

    assert register(acme, "fn").status_code == 201
    # Postgres quotes the value it could not cast, the request with its prompt, in its message
    broken = text("SELECT CAST(CAST(:request AS text) AS integer), :id, :event").bindparams(
        bindparam("request", type_=JSONB))
    monkeypatch.setattr(service, "ACCEPT", broken)
    caplog.set_level(logging.DEBUG)
    resp = client.post("/v1/functions/fn/invocations", json={"prompt": SECRET_PROMPT},
                       headers=acme | {"Prefer": "respond-async"})
    assert resp.status_code == 500 and "unhandled error: database" in caplog.text  # logged
    assert "SQLSTATE 22P02" in caplog.text  # invalid_text_representation, with the statement
    key = acme["Authorization"].removeprefix("Bearer ")
    assert SECRET_PROMPT not in caplog.text and key not in caplog.text
    assert SECRET_PROMPT not in resp.get_data(as_text=True)
