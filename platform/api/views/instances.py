"""Instance API (admin): where functions run, and what their pipelines became."""

from __future__ import annotations

from flask import Blueprint, request

from hydraserve.api.context import db
from hydraserve.api.openapi import operation
from hydraserve.cluster import service as cluster
from hydraserve.cluster.schemas import InstanceList, instance_out
from hydraserve.errors import InvalidRequest

bp = Blueprint("instances", __name__)
MAX_LIMIT = 500
QUERY: dict[str, dict] = {"status": {"type": "string", "enum": ["live", "all"], "default": "live"},
         "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100}}


@operation(bp, "/v1/admin/instances", "GET", summary="List instances (live, or all)",
           auth="admin", response=InstanceList, query_params=QUERY)
def get_instances():
    status = request.args.get("status", "live")
    if status not in ("live", "all"):
        raise InvalidRequest(f"status={status!r}; allowed: live, all", "status")
    raw = request.args.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidRequest(f"limit={raw!r}; allowed: an integer 1..{MAX_LIMIT}", "limit")
    rows = cluster.instances_with_plans(db(), status == "live", int(raw))
    return InstanceList(data=[instance_out(*row) for row in rows]).model_dump(mode="json")
