"""The admin web console at ``/console``: server-rendered pages over the same services as the
API, logged in with an API key (docs/console.md). Registering the blueprint configures the
app's session cookie (``auth.configure``), so the app factory only lists it."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates",
               static_folder="static", static_url_path="/static")

from hydraserve.api.console import auth, billing, filters, pages  # noqa: E402,F401  (on bp)

bp.record_once(lambda state: auth.configure(state.app))  # type: ignore[arg-type]  # a Flask app
