"""A model-store HTTP server for local clusters: files under a root, served with Range support.

Python's ``http.server`` ignores Range, so this is a small ThreadingHTTPServer that answers
``GET``/``HEAD`` with ``200`` (whole file), ``206`` (one byte range, with ``Content-Range``) or
``416`` (unsatisfiable range, ``Content-Range: bytes */size``), always sends ``Accept-Ranges:
bytes`` and ``Content-Length``, keeps connections alive (HTTP/1.1) and sends bodies with
``sendfile``. Paths are confined to the root (no ``..``, no symlink escaping it). Multi-range
requests are answered with the whole file, which RFC 9110 allows.

Run: ``python -m gpu_runtime.store.server --root DIR --port P``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """``(first, last)`` inclusive for a satisfiable single range, ``None`` when the header is
    absent or not a single valid byte range (serve the whole file), ``"unsatisfiable"`` for 416."""
    if not header:
        return None
    m = RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first_s, last_s = m.groups()
    if not first_s:  # suffix range: the last N bytes
        n = int(last_s)
        return "unsatisfiable" if n == 0 or size == 0 else (max(size - n, 0), size - 1)
    first = int(first_s)
    if last_s and int(last_s) < first:
        return None  # syntactically invalid: ignored, as RFC 9110 asks
    if first >= size:
        return "unsatisfiable"
    last = int(last_s) if last_s else size - 1
    return first, min(last, size - 1)


class StoreHandler(BaseHTTPRequestHandler):
    """Serves files of ``server.root``; counts requests and bytes in ``server.stats``."""

    protocol_version = "HTTP/1.1"
    # headers and body leave in two sends; with Nagle on, each small response waits ~40 ms
    # for the client's delayed ACK
    disable_nagle_algorithm = True
    server: StoreServer

    def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def log_message(self, format: str, *args: object) -> None:  # quiet unless asked
        if self.server.verbose:
            super().log_message(format, *args)

    def _serve(self, body: bool) -> None:
        self.server.count("requests")
        path = self._resolve()
        if path is None:
            self._empty(HTTPStatus.NOT_FOUND)
            return
        size = path.stat().st_size
        rng = parse_range(self.headers.get("Range"), size)
        if isinstance(rng, str):  # unsatisfiable
            self._empty(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})
            return
        if rng is None:
            first, last, status, extra = 0, size - 1, HTTPStatus.OK, {}
        else:
            first, last = rng
            status, extra = HTTPStatus.PARTIAL_CONTENT, {"Content-Range": f"bytes {first}-{last}/{size}"}
        length = max(last - first + 1, 0)
        self.send_response(status)
        self._headers(length, extra | {"Content-Type": "application/octet-stream"})
        if body and length:
            self._send_body(path, first, length)

    def _send_body(self, path: Path, first: int, length: int) -> None:
        with open(path, "rb") as f:
            sent = self.wfile_sendfile(f, first, length)
        self.server.count("bytes", sent)

    def wfile_sendfile(self, f, first: int, length: int) -> int:
        """Sends ``length`` bytes of ``f`` from ``first``; a hook tests use to inject faults."""
        self.wfile.flush()
        return self.connection.sendfile(f, first, length)

    def _resolve(self) -> Path | None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        if not rel or "\x00" in rel or any(part == ".." for part in rel.split("/")):
            return None
        root = self.server.root
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path

    def _empty(self, status: HTTPStatus, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self._headers(0, extra or {})

    def _headers(self, length: int, extra: dict[str, str]) -> None:
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()


class StoreServer(ThreadingHTTPServer):
    """A threaded store server rooted at ``root``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
                 handler: type[StoreHandler] = StoreHandler, verbose: bool = False) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"store root {self.root} is not a directory; pass --root DIR")
        self.verbose = verbose
        self.stats = {"requests": 0, "bytes": 0}
        self._stats_lock = threading.Lock()
        super().__init__((host, port), handler)

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up mid-body is routine (a reader was cancelled); stay quiet."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


def serve(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8300,
          background: bool = False, verbose: bool = False) -> StoreServer:
    """Starts a store server for ``root``; blocks unless ``background`` (then a daemon thread
    serves and the caller stops it with ``server.shutdown(); server.server_close()``).
    ``port=0`` picks a free port; read it from ``server.url``."""
    server = StoreServer(root, host, port, verbose=verbose)
    if background:
        threading.Thread(target=server.serve_forever, name="store-server", daemon=True).start()
        return server
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return server


@contextlib.contextmanager
def running(root: str | os.PathLike, host: str = "127.0.0.1",
            port: int = 0) -> Iterator[StoreServer]:
    """A store server for ``root`` serving in a background thread while the block runs, then
    shut down and its socket closed. ``port=0`` picks a free port; read it from ``server.url``."""
    server = serve(root, host, port, background=True)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve model checkpoints with HTTP Range.")
    parser.add_argument("--root", required=True, help="directory holding model folders")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    print(f"serving {Path(args.root).resolve()} on http://{args.host}:{args.port}", flush=True)
    serve(args.root, args.host, args.port, verbose=args.verbose)


if __name__ == "__main__":
    main()
