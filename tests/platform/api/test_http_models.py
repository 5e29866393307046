"""Registering checkpoints served over HTTP with Range requests."""

from __future__ import annotations

import threading
from dataclasses import replace
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpu_runtime.store.server import running


@pytest.fixture
def settings(settings):
    # the stores of these tests listen on ports the kernel picks: any port of 127.0.0.1
    return replace(settings, model_hosts=("127.0.0.1:*",))


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
    assert resp.json["error"]["message"].endswith("(ConnectionError)")  # no socket detail


def serve_redirects(to: str):
    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server hook's name
            self.send_response(302)
            self.send_header("Location", to + self.path.partition("/")[2].partition("/")[2])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_redirect_is_followed_only_to_an_allowed_store(client, acme, register, store_server,
                                                          settings, app):
    inside = serve_redirects(f"{store_server.url}/llama-tiny/")
    outside = serve_redirects("http://127.0.0.2:9/")  # not on the list of stores
    try:
        ok = register(acme, "moved", model=f"http://127.0.0.1:{inside.server_address[1]}/m")
        assert ok.status_code == 201, ok.json
        bad = register(acme, "off", model=f"http://127.0.0.1:{outside.server_address[1]}/m")
        assert bad.status_code == 422
        assert "redirects to a URL that is not an allowed model store" in bad.json["error"][
            "message"]
    finally:
        for server in (inside, outside):
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize("hosts,uri,ok", [
    (("127.0.0.1:8300",), "http://127.0.0.1:8300/m", True),
    (("127.0.0.1:8300",), "http://127.0.0.1:5432/m", False),  # another port of the host
    (("127.0.0.1",), "http://127.0.0.1/m", True),  # no port: the scheme's default
    (("127.0.0.1",), "http://127.0.0.1:8080/m", False),
    (("localhost:*",), "http://127.0.0.1:9999/m", True),  # the same address, by resolution
    (("localhost:*",), "http://127.0.0.2:9999/m", False),  # a local address not on the list
    (("127.0.0.1:*",), "http://127.1:9999/m", True),  # 127.1 is 127.0.0.1
    (("store.invalid:8300",), "http://store.invalid:8300/m", False),  # does not resolve
])
def test_allowed_stores_are_checked_by_port_and_resolved_address(settings, hosts, uri, ok):
    from hydraserve.errors import InvalidRequest
    from hydraserve.functions import stores

    s = replace(settings, model_hosts=hosts)
    assert stores.is_allowed(uri, s) is ok
    if not ok:
        with pytest.raises(InvalidRequest) as info:
            stores.check_store_url(uri, s)
        assert info.value.param == "model"
