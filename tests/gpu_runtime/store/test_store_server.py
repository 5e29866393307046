"""The store server answers Range requests like a CDN would: 200, 206, 416, HEAD, no escape."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from gpu_runtime.store.server import parse_range


@pytest.fixture
def cfg(ckpt_root, store_server):
    path = ckpt_root / "small" / "config.json"
    return store_server.url + "/small/config.json", path.read_bytes()


def test_whole_file_is_200_with_accept_ranges(cfg):
    url, data = cfg
    r = requests.get(url)
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["Accept-Ranges"] == "bytes"
    assert int(r.headers["Content-Length"]) == len(data)


@pytest.mark.parametrize("header,first,last", [
    ("bytes=0-9", 0, 9), ("bytes=5-", 5, None), ("bytes=-7", None, None), ("bytes=3-100000", 3, None),
])
def test_single_range_is_206_with_exact_bytes(cfg, header, first, last):
    url, data = cfg
    r = requests.get(url, headers={"Range": header})
    size = len(data)
    if first is None:  # suffix
        first, last = size - 7, size - 1
    last = size - 1 if last is None else last
    assert r.status_code == 206
    assert r.content == data[first:last + 1]
    assert r.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
    assert int(r.headers["Content-Length"]) == last - first + 1


@pytest.mark.parametrize("header", ["bytes=100000-", "bytes=100000-100010", "bytes=-0"])
def test_unsatisfiable_range_is_416_with_size(cfg, header):
    url, data = cfg
    r = requests.get(url, headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{len(data)}"
    assert r.content == b""


@pytest.mark.parametrize("header", ["bytes=9-3", "items=0-5", "bytes=0-1,4-5", "bytes=x-"])
def test_invalid_or_multi_range_serves_whole_file(cfg, header):
    url, data = cfg
    r = requests.get(url, headers={"Range": header})
    assert (r.status_code, r.content) == (200, data)


def test_head_has_headers_and_no_body(cfg):
    url, data = cfg
    r = requests.head(url, headers={"Range": "bytes=2-5"})
    assert r.status_code == 206
    assert r.headers["Content-Length"] == "4"
    assert r.headers["Content-Range"] == f"bytes 2-5/{len(data)}"
    assert r.content == b""
    r = requests.head(url)
    assert (r.status_code, r.headers["Content-Length"]) == (200, str(len(data)))


def _raw_get(server, path: str) -> int:
    """Status of a request sent verbatim (requests would normalise ``..`` away)."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return int(s.recv(1024).split()[1])


def test_no_path_traversal(ckpt_root, store_server, tmp_path_factory):
    secret = ckpt_root.parent / "secret.txt"
    secret.write_text("top secret")
    os.symlink(secret, ckpt_root / "small" / "escape.txt")
    try:
        for path in ["/../secret.txt", "/small/../../secret.txt", "/%2e%2e/secret.txt",
                     "/small/%2e%2e/%2e%2e/secret.txt", "/small/escape.txt", "/small",
                     "/small/missing.bin", "/%00"]:
            assert _raw_get(store_server, path) == 404, path
        assert _raw_get(store_server, "/small/config.json") == 200
    finally:
        os.unlink(ckpt_root / "small" / "escape.txt")


def test_keep_alive_serves_many_requests_on_one_connection(cfg, store_server):
    url, data = cfg
    before = store_server.stats["requests"]
    with requests.Session() as s:
        for i in range(20):
            assert s.get(url, headers={"Range": f"bytes={i}-{i}"}).content == data[i:i + 1]
    assert store_server.stats["requests"] - before == 20


def test_parse_range_table():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=-20", 10) == (0, 9)
    assert parse_range("bytes=10-", 10) == "unsatisfiable"
    assert parse_range("bytes=-1", 0) == "unsatisfiable"
    assert parse_range("bytes=-", 10) is None


def test_module_entry_point_serves(ckpt_root):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gpu_runtime.store.server", "--root",
                             str(ckpt_root), "--port", str(port)], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/small/config.json",
                                 headers={"Range": "bytes=0-0"}, timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "store server did not start in 20 s"
                time.sleep(0.1)
        assert (r.status_code, r.content) == (206, b"{")
    finally:
        proc.terminate()
        proc.wait(10)
