"""API fixtures: the Flask app on the test's transaction, an admin, and tenants with keys."""

from __future__ import annotations

import pytest

from tests.conftest import ADMIN_KEY


@pytest.fixture
def app(settings, session_factory):
    from hydraserve.api.app import create_app

    return create_app(settings, session_factory)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def admin():
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def make_tenant(client, admin):
    """Creates a tenant over the admin API and returns headers with a fresh key of it."""

    def make(name: str) -> dict[str, str]:
        resp = client.post("/v1/admin/tenants", json={"name": name}, headers=admin)
        assert resp.status_code == 201, resp.json
        resp = client.post(f"/v1/admin/tenants/{name}/keys", json={"name": "t"}, headers=admin)
        assert resp.status_code == 201, resp.json
        return {"Authorization": f"Bearer {resp.json['key']}"}

    return make


@pytest.fixture
def acme(make_tenant):
    return make_tenant("acme")


@pytest.fixture
def llama_uri(store_root) -> str:
    return (store_root / "llama-tiny").as_uri()


@pytest.fixture
def register(client, llama_uri):
    def reg(headers, name="fn", model=None, **extra):
        body = {"model": model or llama_uri, "slo": {"ttft_ms": 5000, "tpot_ms": 200}} | extra
        return client.put(f"/v1/functions/{name}", json=body, headers=headers)

    return reg


@pytest.fixture
def queued(client, acme, register):
    """Accepts ``n`` async invocations of one function; returns their ids."""
    register(acme, "fn")

    def make(n: int) -> list[str]:
        return [client.post("/v1/functions/fn/invocations", json={"prompt_ids": [1, 2]},
                            headers=acme | {"Prefer": "respond-async"}).json["id"]
                for _ in range(n)]

    return make


@pytest.fixture
def fn(acme, register):
    """acme's function "fn" (the tiny Llama); returns acme's headers."""
    assert register(acme, "fn").status_code == 201
    return acme


def invocation_count(db_session) -> int:
    """Invocations stored so far (a request refused before queueing adds none)."""
    from sqlalchemy import func, select

    from hydraserve.invocations.models import Invocation

    return db_session.scalar(select(func.count()).select_from(Invocation))

