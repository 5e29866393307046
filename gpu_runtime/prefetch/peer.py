"""A node serves its cache to its peers by byte range, over the store's own protocol.

``GET /<model>/<file>`` with ``Range: bytes=a-b`` (checkpoint-file coordinates, as the store
is asked) is answered ``206`` from the first complete cached stage of ``<model>`` whose byte
ranges hold all of ``[a, b]``, with ``Content-Range: bytes a-b/*`` (a peer does not know the
file's full size), else ``404``; the entry is pinned while it is read. So a peer's URI,
``http://host:port/<model>``, is a store URI for the bytes it holds: the fetcher, its retries,
its link throttle and the per-tensor checksums work unchanged (docs/consolidation.md).
"""

from __future__ import annotations

import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from gpu_runtime.prefetch.header import COMPLETE, DATA_OFFSET

RANGE_RE = re.compile(r"^bytes=(\d+)-(\d+)$")


class PeerHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: PeerServer

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        parts = unquote(urlsplit(self.path).path).lstrip("/").split("/", 1)
        m = RANGE_RE.match(self.headers.get("Range", "").strip())
        if len(parts) != 2 or m is None or int(m[1]) > int(m[2]):
            self._empty(HTTPStatus.BAD_REQUEST)  # a peer serves single byte ranges only
            return
        model, file = parts
        first, last = int(m[1]), int(m[2])
        found = self.server.pin(model, file, first, last + 1)
        if found is None:
            self._empty(HTTPStatus.NOT_FOUND)
            return
        entry, offset = found
        try:
            length = last - first + 1
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(length))
            self.send_header("Content-Range", f"bytes {first}-{last}/*")
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            view = memoryview(self.server.prefetcher.pool.mm)[offset:offset + length]
            try:
                self.wfile.write(view)
            finally:
                view.release()
            self.server.count(length)
        finally:
            self.server.unpin(entry)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _empty(self, status: HTTPStatus) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class PeerServer(ThreadingHTTPServer):
    """Serves ``prefetcher``'s complete cache entries; ``url(model)`` is the store URI peers
    fetch ``model``'s cached bytes from."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, prefetcher, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), PeerHandler)
        self.host, self.prefetcher = host, prefetcher
        self.bytes_served = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True,
                                        name="peer-cache")

    def start(self) -> PeerServer:
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, model: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}/{model}"

    def pin(self, model: str, file: str, start: int, end: int):
        """(entry, pool offset of ``start``) of a complete entry of ``model`` holding bytes
        ``[start, end)`` of ``file``, pinned; None when none does."""
        cache = self.prefetcher.cache
        with cache._lock:
            for entry in cache.all_live():
                if entry.handle.model != model or entry.state != COMPLETE:
                    continue
                for r in entry.layout.ranges:
                    if r.file == file and r.start <= start and end <= r.end:
                        entry.pins += 1
                        base = entry.handle.extent_offset + DATA_OFFSET
                        return entry, base + r.buffer_offset + (start - r.start)
        return None

    def unpin(self, entry) -> None:
        with self.prefetcher.cache._lock:
            entry.pins -= 1

    def count(self, n: int) -> None:
        with self._lock:
            self.bytes_served += n

    def close(self) -> None:
        self.shutdown()
        self.server_close()
