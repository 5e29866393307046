"""Rows to response schemas."""

from __future__ import annotations

from hydraserve.db.registry import Function, FunctionVersion, Model
from hydraserve.db.tenants import ApiKey, Tenant
from hydraserve.schemas import FunctionOut, KeyOut, ModelOut, Slo, TenantOut, VersionOut
from hydraserve.services.functions import alias_spec


def model_out(m: Model) -> ModelOut:
    return ModelOut(uri=m.uri, architecture=m.architecture, dtype=m.dtype,
                    total_bytes=m.total_bytes, num_parameters=m.num_parameters,
                    num_tensors=len(m.tensors), fingerprint=m.fingerprint)


def version_out(v: FunctionVersion) -> VersionOut:
    return VersionOut(version=v.version, model=model_out(v.model),
                      slo=Slo(ttft_ms=v.ttft_ms, tpot_ms=v.tpot_ms), keep_alive_s=v.keep_alive_s,
                      min_instances=v.min_instances, max_instances=v.max_instances,
                      description=v.description, created_at=v.created_at)


def function_out(fn: Function, tenant: str) -> FunctionOut:
    return FunctionOut(name=fn.name, tenant=tenant, alias_version=fn.alias_version,
                       latest_version=fn.latest_version, spec=version_out(alias_spec(fn)),
                       versions=[v.version for v in fn.versions], created_at=fn.created_at,
                       updated_at=fn.updated_at)


def tenant_out(t: Tenant) -> TenantOut:
    return TenantOut(id=t.id, name=t.name, created_at=t.created_at)


def key_out(k: ApiKey, tenant: str, key: str | None = None) -> KeyOut:
    return KeyOut(id=k.id, tenant=tenant, prefix=k.prefix, role=k.role, name=k.name,
                  created_at=k.created_at, revoked_at=k.revoked_at, key=key)
