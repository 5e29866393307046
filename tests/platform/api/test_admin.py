"""Admin endpoints: tenants, keys, roles."""

from __future__ import annotations


def test_create_and_list_tenants(client, admin):
    resp = client.post("/v1/admin/tenants", json={"name": "acme"}, headers=admin)
    assert resp.status_code == 201 and resp.json["name"] == "acme"
    names = [t["name"] for t in client.get("/v1/admin/tenants", headers=admin).json["data"]]
    assert names == ["acme", "admin"]
    dup = client.post("/v1/admin/tenants", json={"name": "acme"}, headers=admin)
    assert dup.status_code == 409 and "already exists" in dup.json["error"]["message"]


def test_key_is_shown_once_and_stored_hashed(client, admin, db_session):
    from hydraserve.tenants.models import ApiKey

    client.post("/v1/admin/tenants", json={"name": "acme"}, headers=admin)
    created = client.post("/v1/admin/tenants/acme/keys", json={"name": "ci"}, headers=admin).json
    assert created["key"].startswith("hs_") and created["prefix"] == created["key"][:10]
    listed = client.get("/v1/admin/tenants/acme/keys", headers=admin).json["data"]
    assert [k["key"] for k in listed] == [None]
    stored = db_session.get(ApiKey, created["id"])
    assert created["key"] not in (stored.key_hash, stored.prefix) and len(stored.key_hash) == 64


def test_tenant_key_cannot_use_admin_endpoints(client, acme):
    resp = client.get("/v1/admin/tenants", headers=acme)
    assert resp.status_code == 403 and resp.json["error"]["type"] == "permission_error"


def test_admin_role_key_for_a_tenant(client, admin):
    client.post("/v1/admin/tenants", json={"name": "ops"}, headers=admin)
    key = client.post("/v1/admin/tenants/ops/keys", json={"role": "admin"}, headers=admin).json["key"]
    assert client.get("/v1/admin/tenants", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_admin_errors(client, admin):
    resp = client.post("/v1/admin/tenants/ghost/keys", json={}, headers=admin)
    assert resp.status_code == 404 and resp.json["error"]["param"] == "tenant"
    resp = client.post("/v1/admin/tenants", json={"name": "Has Space"}, headers=admin)
    assert resp.status_code == 400 and resp.json["error"]["param"] == "name"
    client.post("/v1/admin/tenants", json={"name": "acme"}, headers=admin)
    resp = client.post("/v1/admin/tenants/acme/keys", json={"role": "root"}, headers=admin)
    assert resp.status_code == 400 and "'tenant' or 'admin'" in resp.json["error"]["message"]
    assert client.delete("/v1/admin/keys/99999", headers=admin).status_code == 404


def test_instance_list_is_admin_only_and_names_bad_filters(client, admin, acme):
    assert client.get("/v1/admin/instances", headers=acme).status_code == 403
    ok = client.get("/v1/admin/instances", headers=admin)
    assert ok.status_code == 200 and ok.json == {"object": "list", "data": []}
    for query, param in (("status=closed", "status"), ("limit=0", "limit"),
                         ("limit=501", "limit"), ("limit=ten", "limit")):
        resp = client.get(f"/v1/admin/instances?{query}", headers=admin)
        assert resp.status_code == 400 and resp.json["error"]["param"] == param, query
        assert query.split("=")[1] in resp.json["error"]["message"]
