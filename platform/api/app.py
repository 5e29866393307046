"""The Flask app factory."""

from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass, field

from flask import Flask, current_app, g, jsonify
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import sessionmaker
from werkzeug.exceptions import HTTPException

from hydraserve.broker import Publisher
from hydraserve.db import make_engine, make_session_factory
from hydraserve.errors import HydraError, RateLimited, ServiceUnavailable
from hydraserve.invocations.admission import Tokenizers
from hydraserve.invocations.replies import ReplyListener
from hydraserve.metrics import RATE_LIMITED
from hydraserve.settings import Settings
from hydraserve.tenants.fairness import Congestion, RequestSlots
from hydraserve.tenants.guard import AuthFailures
from hydraserve.tenants.keycache import KeyCache
from hydraserve.tenants.service import bootstrap_admin_key

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Extension:
    """Per-process state of the API: settings, sessions, and broker clients opened on first use
    (after gunicorn has forked, so no connection is shared between workers)."""

    settings: Settings
    session_factory: sessionmaker
    tokenizers: Tokenizers = field(default_factory=Tokenizers)  # for checks before queueing
    auth_failures: AuthFailures = field(init=False)
    keys: KeyCache = field(default_factory=KeyCache)  # recently authenticated API keys
    slots: RequestSlots = field(init=False)  # request threads, shared fairly between tenants
    congestion: Congestion = field(init=False)  # how many of them the cluster serves at once
    _publisher: Publisher | None = None
    _listener: ReplyListener | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.auth_failures = AuthFailures(self.settings.auth_failures_per_minute)
        self.congestion = Congestion(self.settings.api_threads)
        self.slots = RequestSlots(self.settings.api_threads, self.congestion)

    def publisher(self) -> Publisher:
        with self._lock:
            if self._publisher is None:
                self._publisher = Publisher(self.settings.broker_url)
            return self._publisher

    def listener(self) -> ReplyListener:
        with self._lock:
            if self._listener is None:
                self._listener = ReplyListener(self.settings.broker_url).start()
            return self._listener


def create_app(settings: Settings | None = None,
               session_factory: sessionmaker | None = None) -> Flask:
    """Builds the API. Tests pass a ``session_factory`` bound to a rolled-back transaction."""
    from hydraserve.api import console
    from hydraserve.api.views import (
        billing,
        functions,
        instances,
        invocations,
        meta,
        openai,
        tenants,
    )

    settings = settings or Settings.from_env()
    session_factory = session_factory or make_session_factory(make_engine(settings.database_url))
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes  # larger bodies: 413
    app.json.sort_keys = False  # type: ignore[attr-defined]  # the default provider has it
    app.extensions["hydraserve"] = Extension(settings, session_factory)
    for bp in (meta.bp, functions.bp, invocations.bp, openai.bp, tenants.bp, billing.bp,
               instances.bp, console.bp):
        app.register_blueprint(bp)
    register_error_handlers(app)
    app.teardown_appcontext(close_session)
    if settings.admin_key:
        with session_factory() as session:
            bootstrap_admin_key(session, settings.admin_key)
    return app


def close_session(_exc: BaseException | None) -> None:
    session = g.pop("db", None)
    if session is not None:
        session.close()


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HydraError)
    def hydra_error(exc: HydraError):
        resp = jsonify(exc.to_dict())
        resp.status_code = exc.status
        if isinstance(exc, RateLimited):
            resp.headers["Retry-After"] = str(exc.retry_after_s)
            who = g.get("principal")
            RATE_LIMITED.labels(exc.param or "", who.tenant_name if who else "").inc()
        return resp

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        kind = "not_found_error" if exc.code == 404 else "invalid_request_error"
        message = exc.description
        if exc.code == 413:
            limit = current_app.config["MAX_CONTENT_LENGTH"]
            message = (f"request body is larger than {limit} bytes (HYDRA_MAX_BODY_BYTES); "
                       "send a smaller one")
        resp = jsonify({"error": {"type": kind, "message": message, "param": None}})
        resp.status_code = exc.code or 400
        allowed = getattr(exc, "valid_methods", None)  # MethodNotAllowed carries them
        if exc.code == 405 and allowed:
            resp.headers["Allow"] = ", ".join(allowed)
        return resp

    @app.errorhandler(OperationalError)
    def database_unavailable(exc: OperationalError):
        # the database cannot be reached (down, restarting, out of connections): the request
        # may be retried, unlike a bug's 500
        log.warning("database unavailable: %s", type(exc.orig).__name__)
        resp = hydra_error(ServiceUnavailable("the database is unavailable; retry shortly"))
        resp.headers["Retry-After"] = "1"
        return resp

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log_unexpected(exc)
        resp = jsonify({"error": {"type": "internal_error", "param": None,
                                  "message": "internal error; it has been logged"}})
        resp.status_code = 500
        return resp


def log_unexpected(exc: Exception) -> None:
    """Logs an unhandled error. A database error is logged by class, SQLSTATE, statement and
    traceback, without its message: Postgres quotes the offending value there (a prompt, say),
    and prompts and keys are never written to logs."""
    if not isinstance(exc, DBAPIError):
        log.exception("unhandled error")
        return
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unhandled error: database %s (SQLSTATE %s) in %s\n%s",
              type(exc.orig).__name__, getattr(exc.orig, "sqlstate", None), exc.statement, frames)
