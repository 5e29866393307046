"""Routes declared once, with their schemas; /openapi.json is generated from the same
declarations that validate request bodies, so the document cannot drift from the code."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

from flask import Blueprint, g, request
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from hydraserve.errors import ErrorBody, InvalidRequest, UnsupportedMediaType

REF = "#/components/schemas/{model}"
# what any operation may answer besides its success
ERROR_STATUSES = {"400": "bad request", "401": "missing or invalid API key",
                  "403": "not allowed for this key", "404": "not found",
                  "409": "conflict", "413": "body too large", "415": "body is not JSON",
                  "422": "model cannot be served", "429": "over a limit (Retry-After)",
                  "500": "internal error (logged)",
                  "503": "a dependency (broker, database) is unavailable"}


@dataclass(frozen=True, slots=True)
class Operation:
    rule: str
    method: str
    summary: str
    auth: str | None  # None, "tenant" or "admin"
    body: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int
    path_params: dict[str, dict] = field(default_factory=dict)
    query_params: dict[str, dict] = field(default_factory=dict)


OPERATIONS: list[Operation] = []


@dataclass(frozen=True, slots=True)
class Link:
    """An OpenAPI link: a value of one operation's answer that another operation takes as a
    path parameter. Clients read them as "what next"; schemathesis' stateful run follows them
    (create a function, then read, patch, invoke and delete it)."""

    name: str
    source: str  # "METHOD rule" of the operation whose answer holds the value
    target: str  # "METHOD rule" of the operation that takes it
    param: str  # the target's path parameter
    field: str = "name"  # of the source's answer body


FUNCTION = "/v1/functions/<name>"
INVOKE = "POST /v1/functions/<name>/invocations"
TENANT = "/v1/admin/tenants/<tenant>"
LINKS: list[Link] = [
    Link("ReadFunction", f"PUT {FUNCTION}", f"GET {FUNCTION}", "name"),
    Link("PatchFunction", f"PUT {FUNCTION}", f"PATCH {FUNCTION}", "name"),
    Link("InvokeFunction", f"PUT {FUNCTION}", INVOKE, "name"),
    Link("DeleteFunction", f"PUT {FUNCTION}", f"DELETE {FUNCTION}", "name"),
    Link("ReadPatchedFunction", f"PATCH {FUNCTION}", f"GET {FUNCTION}", "name"),
    Link("ReadInvocation", INVOKE, "GET /v1/invocations/<id>", "id", "id"),
    Link("CancelInvocation", INVOKE, "POST /v1/invocations/<id>/cancel", "id", "id"),
    Link("ReadTenant", "POST /v1/admin/tenants", f"GET {TENANT}", "tenant"),
    Link("SetTenantLimits", "POST /v1/admin/tenants", f"PATCH {TENANT}", "tenant"),
    Link("IssueKey", "POST /v1/admin/tenants", f"POST {TENANT}/keys", "tenant"),
    Link("ListKeys", "POST /v1/admin/tenants", f"GET {TENANT}/keys", "tenant"),
    Link("RevokeKey", f"POST {TENANT}/keys", "DELETE /v1/admin/keys/<int:key_id>", "key_id",
         "id"),
]
# answers besides an operation's success and the errors; an invocation not finished yet (or
# sent with ``Prefer: respond-async``) is answered 202 with its object and a Location
ALSO_ANSWERS: dict[str, dict[str, str]] = {
    INVOKE: {"202": "accepted, not finished yet: poll the Location"},
}


def operation(bp: Blueprint, rule: str, method: str, *, summary: str, auth: str | None = "tenant",
              body: type[BaseModel] | None = None, response: type[BaseModel] | None = None,
              status: int = 200, path_params: dict[str, dict] | None = None,
              query_params: dict[str, dict] | None = None) -> Callable:
    """Registers a view on ``bp`` and documents it. The view receives the validated body as
    ``body=`` and finds the caller in ``g.principal`` (checked here, before the view runs)."""
    op = Operation(rule, method, summary, auth, body, response, status,
                   path_params or {}, query_params or {})
    OPERATIONS.append(op)

    def decorate(view: Callable) -> Callable:
        @wraps(view)
        def wrapper(**kwargs: Any) -> Any:
            from hydraserve.api.auth import require  # late: auth needs the app context

            g.principal = require(auth) if auth else None
            if body is not None:
                kwargs["body"] = parse_body(body)
            return view(**kwargs)

        bp.add_url_rule(rule, endpoint=f"{view.__name__}", view_func=wrapper, methods=[method])
        return wrapper

    return decorate


def parse_body(schema: type[BaseModel]) -> BaseModel:
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise InvalidRequest("request body is empty; send a JSON object")
    mimetype = request.mimetype or ""
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type {mimetype!r} is not supported; send application/json")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply; no field of this API nests "
                             "more than a few levels") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def field_path(loc: tuple) -> str:
    """``stop.0`` for a location; the tags pydantic adds for union members
    (``function-after[...]``, ``list[...]``) are not fields and are left out."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or re.fullmatch(r"\w+", p))


def validation_error(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False)
    first = errors[0]
    param = field_path(first["loc"]) or None
    parts = []
    for err in errors[:5]:
        where = field_path(err["loc"]) or "body"
        got = f" (got {quote(err['input'])})" if where != "body" and "input" in err else ""
        parts.append(f"{where}: {err['msg']}{got}")
    return InvalidRequest("invalid request body: " + "; ".join(parts), param)


def quote(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error never echoes a large input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def spec(title: str, version: str) -> dict:
    """The OpenAPI 3.1 document of every registered operation."""
    models = {m for op in OPERATIONS for m in (op.body, op.response) if m} | {ErrorBody}
    keys, defs = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template=REF)
    by_key = {f"{op.method} {op.rule}": op for op in OPERATIONS}
    unknown = {key for link in LINKS for key in (link.source, link.target)} - by_key.keys()
    assert not unknown, f"links name operations that do not exist: {sorted(unknown)}"
    paths: dict[str, dict] = {}
    for key, op in by_key.items():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", op.rule)
        doc = _operation_doc(op, keys, ALSO_ANSWERS.get(key, {}))
        if links := _links_from(key, by_key):  # on each answer that holds the value
            for status in (str(op.status), *ALSO_ANSWERS.get(key, {})):
                doc["responses"][status]["links"] = links
        paths.setdefault(path, {})[op.method.lower()] = doc
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _links_from(source: str, by_key: dict[str, Operation]) -> dict[str, dict]:
    return {link.name: {"operationId": operation_id(by_key[link.target]),
                        "parameters": {link.param: f"$response.body#/{link.field}"}}
            for link in LINKS if link.source == source}


def operation_id(op: Operation) -> str:
    return f"{op.method.lower()}{op.rule}"


def _operation_doc(op: Operation, keys: dict, also: dict[str, str]) -> dict:
    doc: dict[str, Any] = {"summary": op.summary, "operationId": operation_id(op)}
    params = [{"name": n, "in": "path", "required": True, "schema": s}
              for n, s in op.path_params.items()]
    params += [{"name": n, "in": "query", "required": False, "schema": s}
               for n, s in op.query_params.items()]
    if params:
        doc["parameters"] = params
    if op.body is not None:
        doc["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": keys[(op.body, "validation")]}}}
    ok: dict[str, Any] = {"description": "success"}
    if op.response is not None:
        ok["content"] = {"application/json": {"schema": keys[(op.response, "validation")]}}
    error = {"content": {"application/json": {"schema": keys[(ErrorBody, "validation")]}}}
    doc["responses"] = {str(op.status): ok} | {
        code: ok | {"description": text} for code, text in also.items()} | {
        code: {"description": text, **error} for code, text in ERROR_STATUSES.items()}
    if op.auth:
        doc["security"] = [{"bearer": []}]
    return doc
