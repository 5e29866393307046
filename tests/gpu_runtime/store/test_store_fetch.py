"""Fetching byte ranges: parallel connections, resume after a dropped connection, typed errors."""

from __future__ import annotations

import threading
import zlib
from dataclasses import replace

import pytest
from store_helpers import start_server

from gpu_runtime.store import (
    FetchConfig,
    RangeNotSupportedError,
    RetryPolicy,
    StoreFileNotFoundError,
    StoreUnavailableError,
    TruncatedRangeError,
    fetch_chunks,
    open_reader,
    plan_stage,
    split_chunks,
)
from gpu_runtime.store.server import StoreHandler

FAST_RETRY = RetryPolicy(max_retries=3, backoff_s=0.01, timeout_s=5)


def fetch_all(uri, entries, chunk=256 * 1024, connections=4, retry=FAST_RETRY):
    layout = plan_stage(entries)
    buf = bytearray(layout.size)
    reader = open_reader(uri, retry)
    try:
        stats = fetch_chunks(reader, split_chunks(layout, chunk), memoryview(buf),
                             config=FetchConfig(connections, chunk, retry))
    finally:
        reader.close()
    return layout, buf, stats


def assert_crcs(layout, buf):
    for p in layout.placements:
        assert zlib.crc32(buf[p.buffer_offset:p.buffer_end]) == p.entry.crc32, p.name


@pytest.mark.parametrize("scheme", ["http", "file"])
def test_fetch_gets_exact_bytes_over_parallel_connections(scheme, ckpt_root, ckpt_index,
                                                          store_server):
    uri = store_server.url + "/small" if scheme == "http" else f"file://{ckpt_root / 'small'}"
    layout, buf, stats = fetch_all(uri, ckpt_index.tensors)
    assert_crcs(layout, buf)
    assert stats.bytes == ckpt_index.total_bytes
    assert stats.num_connections == 4
    if scheme == "http":
        assert stats.num_requests == len(split_chunks(layout, 256 * 1024))
        assert store_server.stats["bytes"] == ckpt_index.total_bytes


class DroppingHandler(StoreHandler):
    """Sends only part of the body of the first ``drops`` responses, then hangs up."""

    drops = 0
    lock = threading.Lock()

    def wfile_sendfile(self, f, first, length):
        with DroppingHandler.lock:
            drop = DroppingHandler.drops > 0
            DroppingHandler.drops -= drop
        if not drop or length < 2:
            return super().wfile_sendfile(f, first, length)
        sent = super().wfile_sendfile(f, first, length // 3)
        self.close_connection = True
        self.connection.shutdown(2)
        return sent


def test_dropped_connection_resumes_where_it_stopped(ckpt_root, ckpt_index):
    DroppingHandler.drops = 5
    server = start_server(ckpt_root, DroppingHandler)
    try:
        layout, buf, stats = fetch_all(server.url + "/small", ckpt_index.tensors, chunk=1 << 20)
        assert_crcs(layout, buf)
        assert stats.num_retries == 5
        # resumed requests ask only for the missing tail: bytes served = payload + partial sends
        assert server.stats["bytes"] < ckpt_index.total_bytes * 1.5
    finally:
        server.shutdown()
        server.server_close()


def test_store_that_keeps_dropping_gives_up_with_typed_error(ckpt_root, ckpt_index):
    class AlwaysEmpty(StoreHandler):
        def wfile_sendfile(self, f, first, length):
            self.close_connection = True
            self.connection.shutdown(2)
            return 0

    server = start_server(ckpt_root, AlwaysEmpty)
    try:
        with pytest.raises(StoreUnavailableError, match="failed 4 times in a row"):
            fetch_all(server.url + "/small", ckpt_index.tensors[:2])
    finally:
        server.shutdown()
        server.server_close()


def test_store_that_ignores_range_is_rejected(ckpt_root, ckpt_index):
    class NoRange(StoreHandler):
        def _serve(self, body):
            del self.headers["Range"]
            super()._serve(body)

    server = start_server(ckpt_root, NoRange)
    try:
        with pytest.raises(RangeNotSupportedError, match="ignored the Range header"):
            fetch_all(server.url + "/small", ckpt_index.tensors[1:2])
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def truncated_copy(ckpt_root, ckpt_index, tmp_path):
    """A copy of the checkpoint whose last shard lost its last 1000 bytes."""
    import shutil
    copy = tmp_path / "small"
    shutil.copytree(ckpt_root / "small", copy)
    last = sorted(ckpt_index.file_sizes)[-1]
    with open(copy / last, "r+b") as f:
        f.truncate(ckpt_index.file_sizes[last] - 1000)
    return tmp_path, [t for t in ckpt_index.tensors if t.file == last]


def test_truncated_file_is_a_typed_error_over_http(truncated_copy):
    root, entries = truncated_copy
    server = start_server(root, StoreHandler)
    try:
        with pytest.raises(TruncatedRangeError, match="shorter than the index"):
            fetch_all(server.url + "/small", entries, chunk=64 * 1024)
    finally:
        server.shutdown()
        server.server_close()


def test_truncated_file_is_a_typed_error_over_file(truncated_copy):
    root, entries = truncated_copy
    with pytest.raises(TruncatedRangeError, match="index expects bytes up to"):
        fetch_all(f"file://{root / 'small'}", entries, chunk=64 * 1024)


def test_missing_file_is_not_found(ckpt_root, ckpt_index, store_server):
    ghost = [replace(ckpt_index.tensors[0], file="nope.safetensors")]
    with pytest.raises(StoreFileNotFoundError):
        fetch_all(store_server.url + "/small", ghost)
    with pytest.raises(StoreFileNotFoundError):
        fetch_all(f"file://{ckpt_root / 'small'}", ghost)


def test_server_errors_are_retried(ckpt_root, ckpt_index):
    class Busy(StoreHandler):
        remaining = 2

        def _serve(self, body):
            if Busy.remaining > 0:
                Busy.remaining -= 1
                self.send_response(503)
                self._headers(0, {})
                return
            super()._serve(body)

    server = start_server(ckpt_root, Busy)
    try:
        layout, buf, stats = fetch_all(server.url + "/small", ckpt_index.tensors[:4],
                                       connections=1)
        assert_crcs(layout, buf)
        assert stats.num_retries == 2 and Busy.remaining == 0
    finally:
        server.shutdown()
        server.server_close()
