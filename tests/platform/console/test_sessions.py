"""Console sessions through Flask's test client: the signing key, the idle timeout, a revoked
key, a console without a key. (The browser tests in tests/e2e/test_console.py cover the rest.)"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from hydraserve.settings import Settings, SettingsError
from tests.conftest import ADMIN_KEY


def token(client) -> str:
    html = client.get("/console/login").get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def login(client, key: str = ADMIN_KEY):
    return client.post("/console/login", data={"key": key, "csrf_token": token(client)})


def test_signing_key_is_the_secret_or_derived_from_the_admin_key():
    derived = Settings(admin_key=ADMIN_KEY).console_signing_key
    assert derived == Settings(admin_key=ADMIN_KEY).console_signing_key  # every process alike
    assert derived != Settings(admin_key=ADMIN_KEY + "x").console_signing_key
    assert ADMIN_KEY.encode() not in derived
    assert Settings(console_secret="s" * 32).console_signing_key == b"s" * 32
    assert Settings().console_signing_key is None
    with pytest.raises(SettingsError, match="HYDRA_CONSOLE_SECRET must be at least 32"):
        Settings(console_secret="short")


def test_login_redirects_and_the_cookie_holds_no_key(client):
    resp = login(client)
    assert resp.status_code == 302 and resp.headers["Location"] == "/console/cluster"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert ADMIN_KEY not in cookie
    assert client.get("/console/functions").status_code == 200


def test_an_idle_session_must_log_in_again(client, settings, monkeypatch):
    import hydraserve.api.console.auth as auth

    now = [1_800_000_000.0]
    monkeypatch.setattr(auth.time, "time", lambda: now[0])
    login(client)
    now[0] += settings.console_idle_minutes * 60 - 1
    assert client.get("/console/functions").status_code == 200  # activity restarts the clock
    now[0] += settings.console_idle_minutes * 60 - 1
    assert client.get("/console/api/cluster").status_code == 200  # polling is not activity
    now[0] += 2
    assert client.get("/console/api/cluster").status_code == 401
    resp = client.get("/console/functions")
    assert resp.status_code == 302 and "/console/login" in resp.headers["Location"]
    assert "idle for more than 30 minutes" in client.get("/console/login").get_data(as_text=True)


def test_a_revoked_key_ends_its_sessions(client, db_session):
    from hydraserve.tenants.service import create_tenant, issue_key, revoke_key

    row, key = issue_key(db_session, create_tenant(db_session, "revoked-co"))
    login(client, key)
    assert client.get("/console/functions").status_code == 200
    revoke_key(db_session, row.id)
    assert client.get("/console/functions").status_code == 302


def test_login_with_a_bad_key_is_401_and_open_redirects_are_ignored(client):
    resp = client.post("/console/login", data={"key": "hs_nope", "csrf_token": token(client)})
    assert resp.status_code == 401 and "invalid API key" in resp.get_data(as_text=True)
    resp = client.post("/console/login", data={"key": ADMIN_KEY, "csrf_token": token(client),
                                               "next": "//evil.example/"})
    assert resp.headers["Location"] == "/console/cluster"


def test_a_console_without_a_signing_key_says_how_to_configure_it(settings, session_factory):
    from hydraserve.api.app import create_app

    app = create_app(replace(settings, admin_key=None), session_factory)
    resp = app.test_client().get("/console/login")
    assert resp.status_code == 503
    assert "set HYDRA_CONSOLE_SECRET" in resp.get_data(as_text=True)
