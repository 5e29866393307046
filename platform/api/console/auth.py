"""Console sessions: login with an API key, a signed cookie holding only the key's id and its
tenant, a per-session CSRF token checked on every POST, an idle timeout, logout."""

from __future__ import annotations

import hmac
import secrets
import time

from flask import (
    Flask,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from hydraserve.api.console import bp
from hydraserve.api.context import db, extension, settings
from hydraserve.console.service import principal_of_key
from hydraserve.errors import AuthenticationFailed, HydraError, PermissionDenied
from hydraserve.tenants.service import Principal, authenticate

COOKIE = "hydra_console"
PUBLIC = ("console.login", "console.static")  # reachable without a session
PASSIVE = ("console.cluster_json",)  # polled by an open page: does not count as activity
HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    # scripts only from the console's own static files; data rides in JSON script blocks
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
}


class CsrfRefused(HydraError):
    status = 403
    type = "permission_error"


class ConsoleSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, marked Secure when the request came over TLS (directly,
    or through a proxy gunicorn trusts for X-Forwarded-Proto)."""

    def get_cookie_secure(self, app: Flask) -> bool:  # type: ignore[override]
        return request.is_secure


def configure(app: Flask) -> None:
    """Sets the app's session cookie for the console: signed with the console key, HttpOnly,
    SameSite=Strict, sent to /console only. No key configured: the console refuses logins."""
    app.secret_key = app.extensions["hydraserve"].settings.console_signing_key
    app.session_interface = ConsoleSessionInterface()
    app.config.update(SESSION_COOKIE_NAME=COOKIE, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_PATH="/console")


def csrf_token() -> str:
    """The session's CSRF token, made on first use; every console form carries it."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def who() -> Principal:
    return g.principal


@bp.app_template_global("csrf_token")
def _csrf_global() -> str:
    return csrf_token()


@bp.before_request
def guard() -> Response | None:
    """Every console request: the console must be configured, a POST must carry the session's
    CSRF token, and a page other than the login needs a live session."""
    if request.endpoint == "console.static":
        return None
    if current_app.secret_key is None:
        return _page_error(503, "The console is not configured: set HYDRA_CONSOLE_SECRET (or "
                                "HYDRA_ADMIN_KEY, from which it is derived) and restart the API.")
    if request.method == "POST":
        check_csrf()
    if request.endpoint in PUBLIC:
        return None
    principal = current_principal(touch=request.endpoint not in PASSIVE)
    if principal is None:
        if request.endpoint in PASSIVE:
            return _json_error(401, "the console session has ended; log in again")
        return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
    g.principal = principal
    return None


def check_csrf() -> None:
    sent = request.form.get("csrf_token", "")
    expected = session.get("csrf")
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfRefused("the form's CSRF token is missing or does not match this session; "
                          "reload the page and submit the form again")


def current_principal(touch: bool) -> Principal | None:
    """The session's principal, or None (no session, idle too long, key revoked). ``touch``:
    the request counts as activity and restarts the idle clock."""
    key_id, tenant_id, seen = (session.get(k) for k in ("key_id", "tenant_id", "seen"))
    if not (isinstance(key_id, int) and isinstance(tenant_id, int) and isinstance(seen, int)):
        return None
    now = int(time.time())
    idle_s = settings().console_idle_minutes * 60
    if now - seen > idle_s:
        end_session()
        flash(f"The session was idle for more than {settings().console_idle_minutes} minutes; "
              "log in again.", "error")
        return None
    principal = principal_of_key(db(), key_id, tenant_id)
    if principal is None:
        end_session()
        flash("The key of this session has been revoked; log in with a valid key.", "error")
        return None
    if touch:
        session["seen"] = now
    return principal


def end_session() -> None:
    """Forgets everything but a fresh CSRF token (the login form needs one)."""
    session.clear()
    csrf_token()


@bp.route("/login", methods=["GET", "POST"])
def login():
    """The login form; POST checks the key (rate-limited per address, as the API's Bearer
    check) and opens a session holding the key's id and tenant, never the key."""
    target = _safe_next(request.values.get("next", ""))
    if request.method == "GET":
        return render_template("login.html", next=target)
    failures = extension().auth_failures
    address = request.remote_addr or "unknown"
    try:
        failures.check(address)
        principal = authenticate(db(), request.form.get("key", "").strip())
    except AuthenticationFailed as exc:
        failures.failed(address)
        return render_template("login.html", next=target, error=exc.message), 401
    except HydraError as exc:  # too many failures: 429 with its message
        return render_template("login.html", next=target, error=exc.message), exc.status
    session.clear()  # a new session: nothing of the anonymous one carries over
    session.update(key_id=principal.key_id, tenant_id=principal.tenant_id,
                   tenant=principal.tenant_name, seen=int(time.time()),
                   csrf=secrets.token_urlsafe(32))
    return redirect(target or url_for("console.cluster"))


@bp.post("/logout")
def logout():
    end_session()
    flash("Logged out.", "info")
    return redirect(url_for("console.login"))


def require_admin() -> None:
    if not who().is_admin:
        raise PermissionDenied("this page needs an admin key; this session's key is a "
                               "tenant key")


def _safe_next(target: str) -> str:
    """A redirect target inside the console only (no open redirect)."""
    if target.startswith("/console/") and not target.startswith("//") and "\\" not in target:
        return target
    return ""


@bp.after_request
def security_headers(resp: Response) -> Response:
    for name, value in HEADERS.items():
        resp.headers.setdefault(name, value)
    return resp


@bp.errorhandler(HydraError)
def hydra_error(exc: HydraError):
    if request.endpoint in PASSIVE:
        return _json_error(exc.status, exc.message)
    return _page_error(exc.status, exc.message)


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException):
    return _page_error(exc.code or 400, exc.description or exc.name)


def _page_error(status: int, message: str):
    return render_template("error.html", status=status, message=message), status


def _json_error(status: int, message: str):
    resp = jsonify({"error": {"type": "console_error", "message": message, "param": None}})
    resp.status_code = status
    return resp
