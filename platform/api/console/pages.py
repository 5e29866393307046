"""Console pages: the cluster overview (and its JSON for live refresh), functions, one
function, one invocation with its timeline."""

from __future__ import annotations

from dataclasses import asdict

from flask import redirect, render_template, url_for

from hydraserve.api.console import bp
from hydraserve.api.console.auth import who
from hydraserve.api.context import db
from hydraserve.console import service
from hydraserve.console.figures import PERCENTILES, PHASE_NAMES
from hydraserve.db import utcnow

REFRESH_S = 3  # how often the overview polls /console/api/cluster


@bp.get("/")
def index():
    return redirect(url_for("console.cluster"))


@bp.get("/cluster")
def cluster():
    """Nodes and devices (memory used and free) and the live groups with their stages."""
    view = service.cluster_view(db(), who(), utcnow())
    return render_template("cluster.html", view=view, data=cluster_data(view),
                           refresh_s=REFRESH_S)


@bp.get("/api/cluster")
def cluster_json():
    """What the overview redraws every few seconds (does not extend the idle timeout)."""
    return cluster_data(service.cluster_view(db(), who(), utcnow()))


def cluster_data(view: service.ClusterView) -> dict:
    data = asdict(view)
    for node, nv in zip(data["nodes"], view.nodes, strict=True):
        for dev, dv in zip(node["devices"], nv.devices, strict=True):
            dev["free_bytes"] = dv.free_bytes
    return data


@bp.get("/functions")
def functions():
    rows = service.list_functions(db(), who())
    return render_template("functions.html", rows=rows, percentiles=PERCENTILES)


@bp.get("/functions/<tenant>/<name>")
def function(tenant: str, name: str):
    detail = service.function_detail(db(), who(), tenant, name)
    return render_template("function.html", d=detail, percentiles=PERCENTILES)


@bp.get("/invocations/<invocation_id>")
def invocation(invocation_id: str):
    """The invocation, cold or warm, with its phases drawn as a timeline."""
    d = service.invocation_detail(db(), who(), invocation_id)
    chart = {"labels": [r.label for r in d.rows], "phases": list(PHASE_NAMES),
             "offsets": [r.offset_ms for r in d.rows],
             "series": [[r.phases_ms[p] for r in d.rows] for p in PHASE_NAMES]}
    return render_template("invocation.html", d=d, chart=chart, phases=PHASE_NAMES)
