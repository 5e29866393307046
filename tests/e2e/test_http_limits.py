"""Requests that gunicorn rejects before the app sees them, through the real gunicorn: each is
answered with the API's JSON error body and the right status, and the server goes on serving."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import ADMIN_KEY

SECRET = "hs_" + "k" * 40  # a key on a malformed header line: never echoed whole


def exchange(base: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Sends ``raw`` on a fresh connection and reads the answer until the server closes."""
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(":", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, v in headers.items()}, body


def request(line: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join([line, b"Host: api", *headers, b"", b""])


CASES = {
    "request line too long": (
        request(b"GET /v1/invocations/" + b"a" * 10_000 + b" HTTP/1.1"),
        414, ["limit_request_line", "4094"]),
    "header field too large": (
        request(b"GET /healthz HTTP/1.1", b"X-Big: " + b"b" * 20_000),
        431, ["limit_request_field_size", "8190"]),
    "too many header fields": (
        request(b"GET /healthz HTTP/1.1", *(b"X-N%d: 1" % i for i in range(150))),
        431, ["limit_request_fields", "100"]),
    "garbage request line": (b"NOT-HTTP\r\n\r\n", 400, ["malformed request line"]),
    "binary request line": (
        b"\x16\x03\x01\x02\x00 TLS hello to a plain port\r\n\r\n", 400, ["HTTP method"]),
    "lower-case method": (request(b"get /healthz HTTP/1.1"), 400, ["invalid HTTP method"]),
    "unknown HTTP version": (request(b"GET /healthz HTTP/7.1"), 400, ["HTTP version"]),
    "header without a colon": (
        request(b"GET /healthz HTTP/1.1", b"Authorization Bearer " + SECRET.encode()),
        400, ["invalid header field"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gunicorn_rejections_are_json_errors(api_server, case):
    """Each request gunicorn refuses gets the JSON error body with the status that names the
    problem, a message naming the limit (and its value) or what is malformed, quoting no more
    than a short prefix of the input; the connection is closed and the server serves on."""
    raw, status, words = CASES[case]
    got, headers, body = exchange(api_server, raw)
    assert got == status, (case, got, body[:300])
    assert headers["content-type"] == "application/json", headers
    assert int(headers["content-length"]) == len(body), headers
    assert headers["connection"] == "close", headers
    error = json.loads(body)["error"]
    assert set(error) == {"type", "message", "param"}, error
    assert error["type"] == "invalid_request_error", error
    for word in words:  # the message names the limit and its value
        assert word in error["message"], error
    assert len(error["message"]) < 300, error  # a short prefix of the input at most
    assert "a" * 100 not in error["message"] and SECRET not in error["message"], error
    health = requests.get(f"{api_server}/healthz", timeout=10)  # still serving
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text


def test_the_limits_are_exact(api_server):
    """At each limit the app answers (its own 401 or /healthz); one byte or field over it,
    gunicorn's 414 or 431."""
    def line(size: int) -> bytes:  # a request line of exactly ``size`` bytes
        head, tail = b"GET /v1/invocations/", b" HTTP/1.1"
        return head + b"a" * (size - len(head) - len(tail)) + tail

    def field(size: int) -> bytes:  # a header field of ``size`` bytes with its CRLF
        return b"X-Big: " + b"b" * (size - len(b"X-Big: ") - 2)

    def fields(count: int) -> list[bytes]:  # with Host and Connection, ``count`` in all
        return [b"Connection: close"] + [b"X-N%d: 1" % i for i in range(count - 2)]

    health = b"GET /healthz HTTP/1.1"
    for raw, status in [(request(line(4094), b"Connection: close"), 401),
                        (request(line(4095)), 414),
                        (request(health, b"Connection: close", field(8190)), 200),
                        (request(health, field(8191)), 431),
                        (request(health, *fields(100)), 200),
                        (request(health, *fields(101)), 431)]:
        got, _, body = exchange(api_server, raw)
        assert got == status, (raw[:60], len(raw), got, body[:300])
        assert json.loads(body), body  # the app's answers and gunicorn's are JSON alike


@pytest.mark.parametrize("chunks", [b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n"],
                         ids=["bad chunk size", "missing chunk terminator"])
def test_malformed_chunked_body_is_a_400(api_server, chunks):
    """A body whose chunked framing is broken fails when the app reads it (werkzeug turns
    gunicorn's read error into its 400): a JSON 400, not a 500."""
    raw = request(b"PUT /v1/functions/chunky HTTP/1.1", b"Authorization: Bearer " +
                  ADMIN_KEY.encode(), b"Content-Type: application/json",
                  b"Transfer-Encoding: chunked", b"Connection: close")
    got, headers, body = exchange(api_server, raw + chunks)
    assert got == 400, body[:300]
    assert headers["content-type"] == "application/json", headers
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"], error
