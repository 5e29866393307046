"""The API's gunicorn worker: gunicorn's own errors as the platform's JSON error body.

gunicorn answers a request it cannot parse (a request line over ``limit_request_line``, too
many or too large header fields, a malformed line) before the app sees it, and its answer is
an HTML page. This worker is gunicorn's gthread worker with that one answer replaced: the same
``{"error": {"type", "message", "param"}}`` body the Flask handlers send, a status that names
the problem (414, 431, 400) and a message that names the limit and its value. A message quotes
at most a short prefix of the offending bytes, and the log line quotes none of them: a
malformed ``Authorization`` line would otherwise put part of a key in the log.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from gunicorn import util
from gunicorn.http import errors as http
from gunicorn.workers.gthread import ThreadWorker

from hydraserve.errors import ErrorBody, ErrorDetail

PREFIX_CHARS = 40  # of an offending line or header that a message quotes
LINGER_S = 1.0  # how long a rejected client may go on sending before the socket is closed
LINGER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Rejection:
    """The answer to a request gunicorn refused to parse."""

    status: int
    message: str
    type: str = "invalid_request_error"

    def response(self) -> bytes:
        """The whole HTTP response; the connection is closed after it (the rest of the
        stream cannot be trusted to start at a request boundary)."""
        body = ErrorBody(error=ErrorDetail(type=self.type, message=self.message, param=None))
        payload = body.model_dump_json().encode()
        head = (f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}\r\n"
                "Connection: close\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n")
        return head.encode("latin-1") + payload


def quote(value: object) -> str:
    """``repr(value)`` cut to ``PREFIX_CHARS``: a message never echoes a long input."""
    text = repr(value)
    return text if len(text) <= PREFIX_CHARS else f"{text[:PREFIX_CHARS]}..."


def rejection(exc: BaseException, cfg: Any) -> Rejection | None:
    """What to answer for an error gunicorn raised while reading a request (``cfg`` holds its
    limits); None for any other error, a bug that is logged and answered 500."""
    if isinstance(exc, http.LimitRequestLine):
        return Rejection(414, f"request line is longer than {exc.max_size} bytes "
                              "(limit_request_line); use a shorter URL: names and ids are "
                              "short, and inputs go in the body")
    if isinstance(exc, http.LimitRequestHeaders):
        return Rejection(431, header_limit_message(exc.msg, cfg))
    if isinstance(exc, http.InvalidRequestLine):
        return Rejection(400, f"malformed request line {quote(exc.req)}; "
                              "send 'METHOD /path HTTP/1.1'")
    if isinstance(exc, http.InvalidRequestMethod):
        return Rejection(400, f"invalid HTTP method {quote(exc.method)}; send an upper-case "
                              "method such as GET or POST")
    if isinstance(exc, http.InvalidHTTPVersion):
        return Rejection(400, f"unsupported HTTP version {quote(exc.version)}; "
                              "send HTTP/1.1 or HTTP/1.0")
    return header_rejection(exc) or connection_rejection(exc)


def header_limit_message(which: str, cfg: Any) -> str:
    if which == "limit request headers fields":
        return (f"more than {cfg.limit_request_fields} header fields (limit_request_fields); "
                "send fewer headers")
    if which == "limit request headers fields size":
        return (f"a header field is longer than {cfg.limit_request_field_size} bytes "
                "(limit_request_field_size); send a shorter one")
    return (f"the header fields are larger than {cfg.limit_request_fields} fields of "
            f"{cfg.limit_request_field_size} bytes (limit_request_fields, "
            "limit_request_field_size); send fewer or shorter headers")


def header_rejection(exc: BaseException) -> Rejection | None:
    if isinstance(exc, http.InvalidHeaderName):
        return Rejection(400, f"invalid header field name {quote(exc.hdr)}; a name is a token "
                              "of letters, digits and !#$%&'*+-.^_`|~")
    if isinstance(exc, http.InvalidHeader):
        return Rejection(400, f"invalid header field {quote(exc.hdr)}: not 'Name: value', a "
                              "forbidden character, or a Content-Length or Transfer-Encoding "
                              "that does not frame the body unambiguously")
    if isinstance(exc, http.ObsoleteFolding):
        return Rejection(400, f"header field {quote(exc.hdr)} is folded over lines (obsolete "
                              "line folding); send each field on one line")
    if isinstance(exc, http.UnsupportedTransferCoding):
        # RFC 9112 6.1: a transfer coding the server does not understand is answered 501
        return Rejection(501, f"Transfer-Encoding {quote(exc.hdr)} is not supported; send "
                              "chunked or a Content-Length")
    if isinstance(exc, http.InvalidSchemeHeaders):
        return Rejection(400, "contradictory scheme headers (X-Forwarded-Proto and the like); "
                              "send at most one")
    return None


def connection_rejection(exc: BaseException) -> Rejection | None:
    if isinstance(exc, http.InvalidProxyLine):
        return Rejection(400, "malformed PROXY protocol line")
    if isinstance(exc, http.ForbiddenProxyRequest):
        return Rejection(403, "PROXY protocol is not accepted from this address",
                         "permission_error")
    if isinstance(exc, http.ConfigurationProblem):  # a path outside SCRIPT_NAME
        return Rejection(404, "the path is outside this API's prefix (SCRIPT_NAME)",
                         "not_found_error")
    if isinstance(exc, http.ParseException):  # one added to gunicorn after this was written
        return Rejection(400, f"malformed request ({type(exc).__name__})")
    return None


INTERNAL = Rejection(500, "internal error; it has been logged", "internal_error")


class JsonErrorWorker(ThreadWorker):
    """gunicorn's gthread worker, answering the requests it cannot parse in JSON."""

    def handle_error(self, req: Any, client: socket.socket, addr: Any,
                     exc: BaseException) -> None:
        found = rejection(exc, self.cfg)
        if found is None:
            # called from an ``except`` block, so the traceback is at hand
            self.log.exception("error handling request %s %s", getattr(req, "method", "-"),
                               getattr(req, "path", "-"))
            found = INTERNAL
        else:
            ip = addr[0] if addr else "-"  # a unix socket has no address
            self.log.warning("rejected a request from %s: %d (%s)", ip, found.status,
                             type(exc).__name__)
        try:
            util.write_nonblock(client, found.response())
        except OSError:
            self.log.debug("could not send the error response")
            return
        drain(client)


def drain(sock: socket.socket) -> None:
    """Reads, briefly and up to a bound, what the client is still sending after the answer.

    A socket closed with unread input is reset, not closed, and a client that is still
    sending (the rest of a too-long request line, say) then loses the answer it was sent.
    """
    deadline = time.monotonic() + LINGER_S
    received = 0
    try:
        sock.shutdown(socket.SHUT_WR)
        while received < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(8192)
            if not chunk:
                return
            received += len(chunk)
    except OSError:  # the client has gone, or the linger time is up
        return
