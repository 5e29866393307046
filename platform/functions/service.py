"""Function registry commands: register, read, list, new version or alias move, delete."""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from hydraserve.db import utcnow
from hydraserve.errors import Conflict, InvalidRequest, NotFound
from hydraserve.functions.checkpoints import ensure_model
from hydraserve.functions.models import Function, FunctionVersion, Model
from hydraserve.functions.schemas import FunctionCreate, FunctionPatch
from hydraserve.settings import Settings
from hydraserve.tenants.service import Principal
from hydraserve.validation import check_name

VERSION_FIELDS = ("keep_alive_s", "min_instances", "max_instances", "max_concurrency",
                  "description")


def get_function(session: Session, who: Principal, name: str) -> Function:
    """The caller's live function ``name``; another tenant's function is simply not found."""
    check_name(name, "name", "function name")
    fn = session.scalar(
        select(Function).options(selectinload(Function.versions))
        .where(Function.tenant_id == who.tenant_id, Function.name == name,
               Function.deleted_at.is_(None)))
    if fn is None:
        raise NotFound(f"function {name!r} not found; GET /v1/functions lists yours", "name")
    return fn


class Target(NamedTuple):
    """What an invocation runs against: the alias's version of a live function."""

    function_id: int
    name: str
    version_id: int
    version: int
    model_id: int
    model_uri: str
    vocab_size: int  # what the model's config.json says, for checks before queueing
    context: int  # max_position_embeddings
    max_concurrency: int | None  # the version's own cap on invocations in flight
    unservable_reason: str | None  # set: its starts kept failing (functions/servable.py)


TARGET_LOOKUP = (  # built once: every invocation runs it
    select(Function.id, Function.name, FunctionVersion.id, FunctionVersion.version, Model.id,
           Model.uri, Model.config["vocab_size"].as_integer(),
           Model.config["max_position_embeddings"].as_integer(), FunctionVersion.max_concurrency,
           FunctionVersion.unservable_reason)
    .join(FunctionVersion, (FunctionVersion.function_id == Function.id)
          & (FunctionVersion.version == Function.alias_version))
    .join(Model, Model.id == FunctionVersion.model_id)
    .where(Function.tenant_id == bindparam("tenant_id"), Function.name == bindparam("name"),
           Function.deleted_at.is_(None)))


def get_target(session: Session, who: Principal, name: str) -> Target:
    """The version the alias of the caller's live function ``name`` points at, in one query of
    plain columns on the session's Core connection (the invocation path needs nothing else)."""
    check_name(name, "name", "function name")
    row = session.connection().execute(TARGET_LOOKUP, {"tenant_id": who.tenant_id,
                                                       "name": name}).first()
    if row is None:
        raise NotFound(f"function {name!r} not found; GET /v1/functions lists yours", "name")
    return Target(*row)


def context_lengths(session: Session, who: Principal) -> dict[str, int]:
    """Each live function's context in tokens (its alias version's ``max_position_embeddings``),
    in one query: what OpenAI model objects call ``max_model_len``."""
    rows = session.execute(
        select(Function.name, Model.config["max_position_embeddings"].as_integer())
        .join(FunctionVersion, (FunctionVersion.function_id == Function.id)
              & (FunctionVersion.version == Function.alias_version))
        .join(Model, Model.id == FunctionVersion.model_id)
        .where(Function.tenant_id == who.tenant_id, Function.deleted_at.is_(None)))
    return {name: length for name, length in rows}


def list_functions(session: Session, who: Principal, limit: int, offset: int) -> list[Function]:
    return list(session.scalars(
        select(Function).options(selectinload(Function.versions))
        .where(Function.tenant_id == who.tenant_id, Function.deleted_at.is_(None))
        .order_by(Function.name).limit(limit).offset(offset)))


def register_function(session: Session, who: Principal, name: str, body: FunctionCreate,
                      settings: Settings) -> Function:
    check_name(name, "name", "function name")
    _check_free(session, who, name)
    model = ensure_model(session, body.model, settings)
    fn = Function(tenant_id=who.tenant_id, name=name, alias_version=1, latest_version=1)
    fn.versions.append(FunctionVersion(
        version=1, model_id=model.id, ttft_ms=body.slo.ttft_ms, tpot_ms=body.slo.tpot_ms,
        **{k: getattr(body, k) for k in VERSION_FIELDS}))
    session.add(fn)
    try:
        session.flush()
    except IntegrityError:  # a concurrent PUT of the same name won the race
        session.rollback()
        raise _duplicate(name) from None
    session.commit()
    return fn


def update_function(session: Session, who: Principal, name: str, body: FunctionPatch,
                    settings: Settings) -> Function:
    fn = get_function(session, who, name)
    if body.alias is not None:
        if body.alias not in {v.version for v in fn.versions}:
            raise InvalidRequest(
                f"alias target version {body.alias} does not exist; versions of {name!r}: "
                f"{[v.version for v in fn.versions]}", "alias")
        fn.alias_version = body.alias
    else:
        version = _next_version(session, fn, body, settings)
        _check_instances(version)
        fn.versions.append(version)
        fn.latest_version = fn.alias_version = version.version
    try:
        session.commit()
    except IntegrityError:  # a concurrent PATCH wrote the same version number first
        session.rollback()
        raise Conflict(f"function {name!r} changed while this update ran; read it again and "
                       "retry", "name") from None
    return fn


def delete_function(session: Session, who: Principal, name: str) -> Function:
    fn = get_function(session, who, name)
    fn.deleted_at = utcnow()
    session.commit()
    return fn


def _next_version(session: Session, fn: Function, body: FunctionPatch,
                  settings: Settings) -> FunctionVersion:
    base = fn.alias_spec()
    model_id = ensure_model(session, body.model, settings).id if body.model else base.model_id
    slo = body.slo.model_dump(exclude_none=True) if body.slo else {}
    fields = {k: getattr(body, k) if getattr(body, k) is not None else getattr(base, k)
              for k in VERSION_FIELDS}
    return FunctionVersion(
        version=fn.latest_version + 1, model_id=model_id,
        ttft_ms=slo.get("ttft_ms", base.ttft_ms), tpot_ms=slo.get("tpot_ms", base.tpot_ms),
        **fields)


def _check_instances(v: FunctionVersion) -> None:
    if v.min_instances > v.max_instances:
        raise InvalidRequest(
            f"min_instances ({v.min_instances}) must not exceed max_instances "
            f"({v.max_instances})", "min_instances")


def _check_free(session: Session, who: Principal, name: str) -> None:
    taken = session.scalar(select(Function.latest_version).where(
        Function.tenant_id == who.tenant_id, Function.name == name, Function.deleted_at.is_(None)))
    if taken is not None:
        raise _duplicate(name, taken)


def _duplicate(name: str, version: int | None = None) -> Conflict:
    at = f" (latest version {version})" if version else ""
    return Conflict(
        f"function {name!r} already exists{at}; PATCH it to make a new version, or DELETE it "
        "first", "name")
