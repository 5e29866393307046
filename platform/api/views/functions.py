"""``/v1/functions``: the tenant's model functions."""

from __future__ import annotations

from flask import Blueprint, g, request

from hydraserve.api.context import db, settings
from hydraserve.api.openapi import operation
from hydraserve.errors import InvalidRequest
from hydraserve.functions import service
from hydraserve.functions.schemas import (
    Deleted,
    FunctionCreate,
    FunctionList,
    FunctionOut,
    FunctionPatch,
    function_out,
)
from hydraserve.validation import NAME_PARAM

bp = Blueprint("functions", __name__)
NAME = {"name": NAME_PARAM}
PAGE = {"limit": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
        "offset": {"type": "integer", "minimum": 0, "default": 0}}


def int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter {name}={raw!r} is not an integer", name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"query parameter {name}={value} is out of range {low}..{high}", name)
    return value


@operation(bp, "/v1/functions", "GET", summary="List your functions", response=FunctionList,
           query_params=PAGE)
def list_functions():
    limit, offset = int_arg("limit", 100, 1, 500), int_arg("offset", 0, 0, 10**9)
    fns = service.list_functions(db(), g.principal, limit, offset)
    return FunctionList(data=[function_out(f, g.principal.tenant_name) for f in fns]).model_dump(mode="json")


@operation(bp, "/v1/functions/<name>", "PUT", summary="Register a function", body=FunctionCreate,
           response=FunctionOut, status=201, path_params=NAME)
def register_function(name: str, body: FunctionCreate):
    fn = service.register_function(db(), g.principal, name, body, settings())
    return function_out(fn, g.principal.tenant_name).model_dump(mode="json"), 201


@operation(bp, "/v1/functions/<name>", "GET", summary="Read a function", response=FunctionOut,
           path_params=NAME)
def get_function(name: str):
    fn = service.get_function(db(), g.principal, name)
    return function_out(fn, g.principal.tenant_name).model_dump(mode="json")


@operation(bp, "/v1/functions/<name>", "PATCH", summary="New version, or move the alias",
           body=FunctionPatch, response=FunctionOut, path_params=NAME)
def update_function(name: str, body: FunctionPatch):
    fn = service.update_function(db(), g.principal, name, body, settings())
    return function_out(fn, g.principal.tenant_name).model_dump(mode="json")


@operation(bp, "/v1/functions/<name>", "DELETE", summary="Delete a function", response=Deleted,
           path_params=NAME)
def delete_function(name: str):
    fn = service.delete_function(db(), g.principal, name)
    return Deleted(object="function", name=fn.name, deleted=True).model_dump(mode="json")
