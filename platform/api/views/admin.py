"""``/v1/admin``: tenants and API keys (admin keys only)."""

from __future__ import annotations

from flask import Blueprint

from hydraserve.api.auth import db
from hydraserve.api.openapi import operation
from hydraserve.api.serialize import key_out, tenant_out
from hydraserve.db.tenants import Tenant
from hydraserve.schemas import (
    NAME_PATTERN,
    KeyCreate,
    KeyList,
    KeyOut,
    TenantCreate,
    TenantList,
    TenantOut,
)
from hydraserve.services import tenants as service

bp = Blueprint("admin", __name__)
TENANT = {"tenant": {"type": "string", "pattern": NAME_PATTERN}}


@operation(bp, "/v1/admin/tenants", "POST", summary="Create a tenant", auth="admin",
           body=TenantCreate, response=TenantOut, status=201)
def create_tenant(body: TenantCreate):
    return tenant_out(service.create_tenant(db(), body.name)).model_dump(mode="json"), 201


@operation(bp, "/v1/admin/tenants", "GET", summary="List tenants", auth="admin",
           response=TenantList)
def list_tenants():
    rows = db().query(Tenant).order_by(Tenant.name).all()
    return TenantList(data=[tenant_out(t) for t in rows]).model_dump(mode="json")


@operation(bp, "/v1/admin/tenants/<tenant>/keys", "POST", summary="Issue an API key",
           auth="admin", body=KeyCreate, response=KeyOut, status=201, path_params=TENANT)
def create_key(tenant: str, body: KeyCreate):
    service.check_name(tenant, "tenant", "tenant name")
    t = service.get_tenant(db(), tenant)
    row, key = service.issue_key(db(), t, body.name, body.role)
    return key_out(row, t.name, key).model_dump(mode="json"), 201


@operation(bp, "/v1/admin/tenants/<tenant>/keys", "GET", summary="List a tenant's keys",
           auth="admin", response=KeyList, path_params=TENANT)
def list_keys(tenant: str):
    service.check_name(tenant, "tenant", "tenant name")
    t = service.get_tenant(db(), tenant)
    return KeyList(data=[key_out(k, t.name) for k in t.keys]).model_dump(mode="json")


@operation(bp, "/v1/admin/keys/<int:key_id>", "DELETE", summary="Revoke an API key",
           auth="admin", response=KeyOut,
           path_params={"key_id": {"type": "integer", "minimum": 1,
                                    "maximum": service.MAX_ID}})
def revoke_key(key_id: int):
    row = service.revoke_key(db(), key_id)
    return key_out(row, row.tenant.name).model_dump(mode="json")
