"""Function versions that cannot start. A version whose cold starts keep failing on their
nodes (the scheduler counts them, scheduler/loop.py) is marked unservable with the cause:
nothing starts it again, its queued invocations fail with the cause, and new ones are refused
at once (422), instead of every request waiting out HYDRA_MAX_QUEUE_S behind starts that fail.
A new version (``PATCH /v1/functions/<name>``) starts clean; an admin may clear the mark
(``POST /v1/admin/tenants/<tenant>/functions/<name>/clear-unservable``, ``hydraserve admin
clear-unservable``) after fixing what was wrong outside the checkpoint (a node, a store)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from hydraserve.cluster.models import ERROR_CHARS
from hydraserve.db import utcnow
from hydraserve.errors import Conflict, InvalidModel, NotFound
from hydraserve.functions.models import Function, FunctionVersion
from hydraserve.tenants.models import Tenant


def mark_unservable(session: Session, fv: FunctionVersion, reason: str) -> None:
    """Marks ``fv`` unservable with ``reason``; no commit."""
    fv.unservable_reason, fv.unservable_at = reason[:ERROR_CHARS], utcnow()
    session.flush()


def message(version: int, reason: str) -> str:
    return (f"version {version} of this function cannot start ({reason}); register a new "
            "version (PATCH /v1/functions/<name>) or ask an admin to clear it")


def unservable_error(fv: FunctionVersion) -> dict:
    """The error its queued invocations fail with."""
    return {"type": InvalidModel.type, "param": "model",
            "message": message(fv.version, fv.unservable_reason or "")}


def refuse(version: int, reason: str | None) -> None:
    """Raises the 422 a new invocation of an unservable version gets."""
    if reason is not None:
        raise InvalidModel(message(version, reason), "model")


def clear(session: Session, tenant: str, name: str) -> FunctionVersion:
    """An admin clears the mark of the function's alias version; its failed starts so far no
    longer count. Commits."""
    fv = session.scalar(
        select(FunctionVersion).join(Function, (Function.id == FunctionVersion.function_id)
                                     & (Function.alias_version == FunctionVersion.version))
        .join(Tenant, Tenant.id == Function.tenant_id)
        .where(Tenant.name == tenant, Function.name == name, Function.deleted_at.is_(None)))
    if fv is None:
        raise NotFound(f"function {name!r} of tenant {tenant!r} not found", "name")
    if fv.unservable_reason is None:
        raise Conflict(f"version {fv.version} of {name!r} is not marked unservable", "name")
    fv.unservable_reason, fv.unservable_at, fv.starts_cleared_at = None, None, utcnow()
    session.commit()
    return fv
