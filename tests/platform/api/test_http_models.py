"""Registering checkpoints served over HTTP with Range requests."""

from __future__ import annotations

import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpu_runtime.store.server import running


@pytest.fixture
def store_server(store_root):
    with running(store_root) as server:
        yield server


@pytest.fixture
def plain_server(store_root):
    """A server that ignores Range, as Python's http.server does."""
    handler = partial(SimpleHTTPRequestHandler, directory=str(store_root))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_checkpoint_indexes_like_the_file(client, acme, register, store_server, llama_uri):
    over_http = register(acme, "web", model=f"{store_server.url}/llama-tiny")
    assert over_http.status_code == 201, over_http.json
    on_disk = register(acme, "disk", model=llama_uri)
    assert over_http.json["spec"]["model"]["fingerprint"] == on_disk.json["spec"]["model"]["fingerprint"]
    assert store_server.stats["requests"] > 3  # headers and bytes came over ranged requests


def test_http_missing_checkpoint(client, acme, register, store_server):
    resp = register(acme, "web", model=f"{store_server.url}/nothing-here")
    assert resp.status_code == 422
    assert "config.json is missing" in resp.json["error"]["message"]


def test_server_without_range_support(client, acme, register, plain_server):
    resp = register(acme, "web", model=f"{plain_server}/llama-tiny")
    assert resp.status_code == 422, resp.json
    assert "does not answer Range requests" in resp.json["error"]["message"]


def test_unreachable_store(client, acme, register):
    resp = register(acme, "web", model="http://127.0.0.1:9/llama")
    assert resp.status_code == 422 and "cannot reach" in resp.json["error"]["message"]
