"""Health, the OpenAPI document (both unauthenticated) and the metrics (admin keys)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from hydraserve.api import openapi
from hydraserve.api.context import db
from hydraserve.billing import service as billing
from hydraserve.cluster import service as cluster
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
    return Response(body + cluster_exposition(), content_type=content_type)


def cluster_exposition() -> bytes:
    """What Postgres knows, read at scrape time: instances by status, GB-seconds by tenant."""
    registry = CollectorRegistry()
    instances = Gauge("hydraserve_instances", "Instances by status (live and closed so far)",
                      ["status"], registry=registry)
    for status, n in cluster.instances_by_status(db()).items():
        instances.labels(status).set(n)
    held = Gauge("hydraserve_gb_seconds", "GB of device memory x seconds held, by tenant (open "
                 "usage records up to now)", ["tenant"], registry=registry)
    for tenant, value in billing.gb_seconds_by_tenant(db()).items():
        held.labels(tenant).set(value)
    return generate_latest(registry)
