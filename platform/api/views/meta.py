"""Health, the OpenAPI document (both unauthenticated) and the metrics (admin keys)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from hydraserve.api import openapi
from hydraserve.api.context import db
from hydraserve.errors import ServiceUnavailable
from hydraserve.metrics import exposition

bp = Blueprint("meta", __name__)
VERSION = "0.1.0"


@bp.get("/openapi.json")
def openapi_json():
    """The OpenAPI 3.1 document, generated from the schemas that validate requests."""
    return jsonify(openapi.spec("HydraServe API", VERSION))


@bp.get("/healthz")
def healthz():
    """Liveness plus a database round trip."""
    try:
        db().execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise ServiceUnavailable(f"database unreachable: {type(exc).__name__}") from None
    return {"status": "ok", "version": VERSION}


@bp.get("/metrics")
def metrics():
    """Prometheus text exposition of every API process (docs/metrics.md); an admin key, since
    the labels name tenants and functions (Prometheus sends it as a bearer credential)."""
    from hydraserve.api.auth import require

    require("admin")
    body, content_type = exposition()
    return Response(body, content_type=content_type)
