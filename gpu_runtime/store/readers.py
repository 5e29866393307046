"""Readers that copy a byte range of a checkpoint file straight into a destination buffer.

``file://`` uses positional reads (``os.preadv``) into the buffer; ``http(s)://`` uses Range
requests over keep-alive connections (one ``requests.Session`` per thread) and, when a
connection drops mid-range, resumes from the first byte not yet received. Both call ``throttle``
before each piece (the emulated link) and ``on_bytes`` after it (progress).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, unquote, urlparse

import requests
import urllib3

from gpu_runtime.store.errors import (
    RangeNotSupportedError,
    StoreError,
    StoreFileNotFoundError,
    StoreUnavailableError,
    TruncatedRangeError,
)

Callback = Callable[[int], None]
# errors after which a Range request is retried from the first missing byte
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")  # *: a peer cache
RETRYABLE = (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError,
             ConnectionError, TimeoutError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a range is retried after a failure that made no progress, and the backoff."""

    max_retries: int = 5
    backoff_s: float = 0.05
    # the longest silence of a connection (to connect, or between two reads of its bytes)
    # before the range is asked again: a store that stalls costs a cold start this long, not
    # the whole fetch; a false alarm (a store paused on a busy machine) costs one reconnect, as
    # the retry resumes from the first byte not yet received
    timeout_s: float = 3.0
    piece_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"retry policy needs max_retries >= 0, backoff_s >= 0, "
                             f"timeout_s > 0; got {self.max_retries}, {self.backoff_s}, "
                             f"{self.timeout_s}")
        if self.piece_bytes < 4096:
            raise ValueError(f"piece_bytes must be >= 4096, got {self.piece_bytes}")


@dataclass(slots=True)
class ReadCounters:
    requests: int = 0
    retries: int = 0


class RangeReader(Protocol):
    counters: ReadCounters

    def read_into(self, file: str, start: int, dest: memoryview, throttle: Callback,
                  on_bytes: Callback) -> None:
        """Fills ``dest`` with bytes ``[start, start + len(dest))`` of ``file``."""

    def close(self) -> None: ...


def open_reader(uri: str, policy: RetryPolicy = RetryPolicy()) -> RangeReader:
    """A reader for the checkpoint directory at ``uri`` (``file://`` or ``http(s)://``)."""
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return FileReader(uri, policy)
    if scheme in ("http", "https"):
        return HttpReader(uri, policy)
    raise StoreError(f"unsupported store URI scheme {scheme!r} in {uri!r}; use "
                     "file:///path/to/dir or http(s)://host/path", "model")


class FileReader:
    """Positional reads from a local directory (a mounted model store)."""

    def __init__(self, uri: str, policy: RetryPolicy = RetryPolicy()) -> None:
        self.root = Path(unquote(urlparse(uri).path))
        if not self.root.is_dir():
            raise StoreFileNotFoundError(f"model directory {self.root} does not exist")
        self.policy = policy
        self.counters = ReadCounters()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, file: str) -> int:
        with self._lock:
            if file not in self._fds:
                path = (self.root / file).resolve()
                if not path.is_relative_to(self.root.resolve()) or not path.is_file():
                    raise StoreFileNotFoundError(f"{file} is not a file in {self.root}")
                self._fds[file] = os.open(path, os.O_RDONLY)
                self.counters.requests += 1
            return self._fds[file]

    def read_into(self, file: str, start: int, dest: memoryview, throttle: Callback,
                  on_bytes: Callback) -> None:
        fd = self._fd(file)
        pos, total, piece = 0, len(dest), self.policy.piece_bytes
        while pos < total:
            n = min(piece, total - pos)
            throttle(n)
            got = os.preadv(fd, [dest[pos:pos + n]], start + pos)
            if got == 0:
                raise TruncatedRangeError(
                    f"{self.root / file} ends at byte {start + pos}, but the index expects "
                    f"bytes up to {start + total}; re-register the model if the file changed")
            pos += got
            on_bytes(got)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class HttpReader:
    """Range requests against an HTTP store, resuming where a dropped connection stopped."""

    def __init__(self, uri: str, policy: RetryPolicy = RetryPolicy()) -> None:
        self.base = uri.rstrip("/")
        self.policy = policy
        self.counters = ReadCounters()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._lock:
                self._sessions.append(session)
        return session

    def url(self, file: str) -> str:
        return f"{self.base}/{quote(file)}"

    def read_into(self, file: str, start: int, dest: memoryview, throttle: Callback,
                  on_bytes: Callback) -> None:
        total, received, failures = len(dest), 0, 0
        while received < total:
            before = received
            try:
                received = self._read_once(file, start, received, dest, throttle, on_bytes)
            except _Progress as partial:
                received = partial.received
                failures = 0 if received > before else failures + 1
                if failures > self.policy.max_retries:
                    raise StoreUnavailableError(
                        f"GET {self.url(file)} bytes {start + received}-{start + total - 1} "
                        f"failed {failures} times in a row ({partial.cause}); check the store "
                        "or raise the retry limit") from partial.cause
                with self._lock:
                    self.counters.retries += 1
                self._local.session = None  # the connection may be broken: open a new one
                time.sleep(self.policy.backoff_s * 2 ** max(failures - 1, 0))

    def _read_once(self, file: str, start: int, received: int, dest: memoryview,
                   throttle: Callback, on_bytes: Callback) -> int:
        """One request for the missing tail; raises _Progress on a retryable failure."""
        first, last, total = start + received, start + len(dest) - 1, len(dest)
        with self._lock:
            self.counters.requests += 1
        try:
            resp = self._session().get(
                self.url(file), headers={"Range": f"bytes={first}-{last}",
                                         "Accept-Encoding": "identity"},
                stream=True, timeout=self.policy.timeout_s)
        except RETRYABLE as exc:
            raise _Progress(received, exc) from exc
        with resp:
            if resp.status_code >= 500:
                raise _Progress(received, StoreError(
                    f"GET {self.url(file)} answered HTTP {resp.status_code}"))
            self._check_response(resp, file, first, last)
            try:
                while received < total:
                    n = min(self.policy.piece_bytes, total - received)
                    throttle(n)
                    got = resp.raw.readinto(dest[received:received + n])
                    if not got:
                        raise ConnectionError(f"connection closed after {received} bytes")
                    received += got
                    on_bytes(got)
            except RETRYABLE as exc:
                raise _Progress(received, exc) from exc
        return received

    def _check_response(self, resp: requests.Response, file: str, first: int, last: int) -> None:
        url, code = self.url(file), resp.status_code
        if code == 206:
            got = resp.headers.get("Content-Range", "")
            m = CONTENT_RANGE_RE.match(got)
            if m and int(m[1]) == first and int(m[2]) < last and m[3] != "*" \
                    and int(m[3]) <= last:
                raise TruncatedRangeError(
                    f"{url} holds {m[3]} bytes but the index needs bytes up to {last + 1}: "
                    "the file is shorter than the index says; re-register the model if the "
                    "file changed")
            if not m or (int(m[1]), int(m[2])) != (first, last):
                raise RangeNotSupportedError(
                    f"GET {url} asked for bytes {first}-{last} but the store answered "
                    f"Content-Range {got!r}")
            return
        if code == 404:
            raise StoreFileNotFoundError(f"{url} is not in the store (HTTP 404)")
        if code == 416:
            raise TruncatedRangeError(
                f"{url} has no bytes {first}-{last} (HTTP 416, Content-Range "
                f"{resp.headers.get('Content-Range')!r}): the file is shorter than the index "
                "says; re-register the model if the file changed")
        if code == 200 and first == 0 and resp.headers.get("Content-Length") == str(last + 1):
            return  # the range is the whole file; some stores answer that with a plain 200
        if code == 200:
            raise RangeNotSupportedError(
                f"{url} ignored the Range header (HTTP 200); the store must answer Range "
                "requests with 206, e.g. `hydraserve store` or nginx")
        raise StoreError(f"GET {url} bytes {first}-{last} answered HTTP {code}")

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


class _Progress(Exception):
    """A retryable failure after ``received`` bytes of the current range."""

    def __init__(self, received: int, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.received = received
        self.cause = cause
