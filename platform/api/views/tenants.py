"""``/v1/admin``: tenants and API keys (admin keys only)."""

from __future__ import annotations

from flask import Blueprint

from hydraserve.api.context import db, extension
from hydraserve.api.openapi import operation
from hydraserve.functions import servable
from hydraserve.functions.schemas import FunctionOut, function_out
from hydraserve.tenants import service
from hydraserve.tenants.schemas import (
    KeyCreate,
    KeyList,
    KeyOut,
    TenantCreate,
    TenantList,
    TenantOut,
    TenantPatch,
    key_out,
    tenant_out,
)
from hydraserve.validation import NAME_PARAM

bp = Blueprint("admin", __name__)
TENANT = {"tenant": NAME_PARAM}


@operation(bp, "/v1/admin/tenants", "POST", summary="Create a tenant", auth="admin",
           body=TenantCreate, response=TenantOut, status=201)
def create_tenant(body: TenantCreate):
    return tenant_out(service.create_tenant(db(), body.name)).model_dump(mode="json"), 201


@operation(bp, "/v1/admin/tenants", "GET", summary="List tenants", auth="admin",
           response=TenantList)
def list_tenants():
    rows = service.list_tenants(db())
    return TenantList(data=[tenant_out(t) for t in rows]).model_dump(mode="json")


@operation(bp, "/v1/admin/tenants/<tenant>", "GET", summary="Read a tenant and its limits",
           auth="admin", response=TenantOut, path_params=TENANT)
def get_tenant(tenant: str):
    return tenant_out(service.get_tenant(db(), tenant)).model_dump(mode="json")


@operation(bp, "/v1/admin/tenants/<tenant>", "PATCH", summary="Set a tenant's limits",
           auth="admin", body=TenantPatch, response=TenantOut, path_params=TENANT)
def patch_tenant(tenant: str, body: TenantPatch):
    limits = body.limits.model_dump(exclude_none=True)
    out = tenant_out(service.set_limits(db(), tenant, limits)).model_dump(mode="json")
    extension().keys.clear()  # the cached principals carry the old limits
    return out


@operation(bp, "/v1/admin/tenants/<tenant>/keys", "POST", summary="Issue an API key",
           auth="admin", body=KeyCreate, response=KeyOut, status=201, path_params=TENANT)
def create_key(tenant: str, body: KeyCreate):
    t = service.get_tenant(db(), tenant)
    row, key = service.issue_key(db(), t, body.name, body.role)
    return key_out(row, t.name, key).model_dump(mode="json"), 201


@operation(bp, "/v1/admin/tenants/<tenant>/keys", "GET", summary="List a tenant's keys",
           auth="admin", response=KeyList, path_params=TENANT)
def list_keys(tenant: str):
    t = service.get_tenant(db(), tenant)
    return KeyList(data=[key_out(k, t.name) for k in t.keys]).model_dump(mode="json")


@operation(bp, "/v1/admin/keys/<int:key_id>", "DELETE", summary="Revoke an API key",
           auth="admin", response=KeyOut,
           path_params={"key_id": {"type": "integer", "minimum": 1,
                                    "maximum": service.MAX_ID}})
def revoke_key(key_id: int):
    row = service.revoke_key(db(), key_id)
    extension().keys.clear()  # refused from now on in this process, within TTL_S in the others
    return key_out(row, row.tenant.name).model_dump(mode="json")


@operation(bp, "/v1/admin/tenants/<tenant>/functions/<name>/clear-unservable", "POST",
           summary="Clear a function version's unservable mark", auth="admin",
           response=FunctionOut, path_params=TENANT | {"name": NAME_PARAM})
def clear_unservable(tenant: str, name: str):
    fv = servable.clear(db(), tenant, name)
    return function_out(fv.function, tenant).model_dump(mode="json")

