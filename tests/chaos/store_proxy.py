"""A fault-injecting HTTP proxy in front of the cluster's model store, for the chaos suite.

A model registered as ``http://127.0.0.1:<proxy>/<tag>/<model>`` is read through the proxy
(``/<tag>`` is dropped on the way to the store, so each test gets models of its own URI, never
cached on a node). ``arm(tag, fault, times)`` makes the next ``times`` Range requests for a
``.safetensors`` file of that tag fail one way:

- ``stall``: the request is read and never answered (the connection is held, then closed);
- ``cut``: the store's headers go out (the full Content-Length), then half the body, then the
  connection closes;
- ``short``: a 206 whose Content-Length is half the range it claims in Content-Range, with
  that half of the body (a store that answers less than it says it holds).

Every request is logged with what was done to it, so a test can check the reader's retry.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gpu_runtime.ports import free_port

FAULTS = ("stall", "cut", "short")
PASSED_HEADERS = ("Content-Type", "Content-Length", "Content-Range", "Accept-Ranges")


@dataclass(frozen=True, slots=True)
class Logged:
    tag: str
    path: str  # the store's path
    range: str | None
    action: str  # "pass" or the fault applied
    sent_bytes: int  # body bytes that went out


@dataclass
class StoreProxy:
    stall_s: float = 45.0  # longer than the reader's 3 s timeout: it gives up, then retries
    upstream_port: int | None = None
    port: int = field(default_factory=free_port)
    log: list[Logged] = field(default_factory=list)
    _armed: dict[str, list[str]] = field(default_factory=dict)  # tag -> faults to apply, in order
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closing: threading.Event = field(default_factory=threading.Event)

    def start(self) -> StoreProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name="store-proxy").start()
        return self

    def close(self) -> None:
        self._closing.set()  # stalled requests end now
        self._server.shutdown()
        self._server.server_close()

    def uri(self, tag: str, model: str) -> str:
        return f"http://127.0.0.1:{self.port}/{tag}/{model}"

    def arm(self, tag: str, *faults: str) -> None:
        assert all(f in FAULTS for f in faults), f"faults {faults}; allowed {FAULTS}"
        with self._lock:
            self._armed.setdefault(tag, []).extend(faults)

    def take(self, tag: str, path: str, has_range: bool) -> str:
        """The fault for this request, if one is armed and it is a weight range request."""
        with self._lock:
            armed = self._armed.get(tag)
            if armed and has_range and path.endswith(".safetensors"):
                return armed.pop(0)
        return "pass"

    def record(self, entry: Logged) -> None:
        with self._lock:
            self.log.append(entry)

    def entries(self, tag: str) -> list[Logged]:
        with self._lock:
            return [e for e in self.log if e.tag == tag]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: StoreProxy

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
        self._proxy(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._proxy(body=True)

    def _proxy(self, body: bool) -> None:
        tag, _, path = self.path.lstrip("/").partition("/")
        rng = self.headers.get("Range")
        action = self.owner.take(tag, path, rng is not None) if body else "pass"
        if action == "stall":
            self.owner.record(Logged(tag, path, rng, action, 0))
            self.owner._closing.wait(self.owner.stall_s)
            self.close_connection = True
            return
        status, headers, data = self._upstream("GET" if body else "HEAD", "/" + path, rng)
        sent = len(data) // 2 if action in ("cut", "short") else len(data)
        self.send_response(status)
        for name in PASSED_HEADERS:
            if name in headers:
                value = str(sent) if name == "Content-Length" and action == "short" else \
                    headers[name]
                self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data[:sent])
        self.owner.record(Logged(tag, path, rng, action, sent if body else 0))
        if action == "cut":
            self.close_connection = True  # fewer bytes than Content-Length, then EOF

    def _upstream(self, method: str, path: str, rng: str | None) -> tuple[int, dict, bytes]:
        assert self.owner.upstream_port is not None, "the proxy has no store behind it yet"
        conn = http.client.HTTPConnection("127.0.0.1", self.owner.upstream_port, timeout=30)
        try:
            conn.request(method, path, headers={"Range": rng} if rng else {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()
