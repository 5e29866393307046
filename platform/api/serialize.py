"""Rows to response schemas."""

from __future__ import annotations

from hydraserve.db.registry import Function, FunctionVersion, Model
from hydraserve.db.serving import Invocation
from hydraserve.db.tenants import ApiKey, Tenant
from hydraserve.schemas import (
    FunctionOut,
    InvocationOut,
    KeyOut,
    ModelOut,
    Slo,
    TenantOut,
    Timings,
    VersionOut,
)
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


def invocation_out(inv: Invocation, function: str, version: int) -> InvocationOut:
    return InvocationOut(
        id=inv.id, function=function, version=version, status=inv.status, cold=inv.cold,
        output=inv.output, error=inv.error, tokens_in=inv.tokens_in, tokens_out=inv.tokens_out,
        attempts=inv.attempts, instance_ids=inv.instance_ids or [], timings=timings(inv))


PHASES = (("plan", "planned_at"), ("fetch", "fetched_at"), ("load", "loaded_at"),
          ("first_token", "first_token_at"))


def timings(inv: Invocation) -> Timings:
    """Phase durations of the TTFT. Each phase starts where the previous one ended, or when the
    invocation was queued if that was later (a request may join a cold start already running)."""
    breakdown: dict[str, float] = {}
    prev = inv.queued_at
    for phase, attr in PHASES:
        at = getattr(inv, attr)
        if at is None:
            continue
        breakdown[phase] = max((at - prev).total_seconds() * 1000, 0.0)
        prev = max(prev, at)
    ttft = ((inv.first_token_at - inv.queued_at).total_seconds() * 1000
            if inv.first_token_at else None)
    return Timings(queued_at=inv.queued_at, planned_at=inv.planned_at, fetched_at=inv.fetched_at,
                   loaded_at=inv.loaded_at, first_token_at=inv.first_token_at,
                   finished_at=inv.finished_at, ttft_ms=ttft, breakdown_ms=breakdown)
