"""/metrics through gunicorn: the samples of both API workers in one exposition (multiprocess
mode), and every 429 a client saw counted there."""

from __future__ import annotations

import http.client
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, PROMTOOL, promtool_problems


def get(base: str, path: str, key: str, source: str) -> tuple[int, str]:
    """A GET from the loopback address ``source``: the failed-authentication guard counts per
    client address, so the address that is refused is not the one that reads the metrics."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30,
                                      source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_every_429_of_the_workers_is_counted_in_one_exposition(api_server):
    # from eight threads at once, so both workers take some (each refuses an address after
    # 20 failures a minute); whichever took them, the exposition must count every 429
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(
            lambda _: get(api_server, "/v1/functions", "hs_not-a-key", "127.0.0.2")[0],
            range(80)))
    assert set(statuses) == {401, 429}
    status, text = get(api_server, "/metrics", ADMIN_KEY, "127.0.0.3")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counted = sum(s.value for s in families["hydraserve_rate_limited"].samples
                  if s.name.endswith("_total") and s.labels["limit"] == "authorization")
    assert counted == statuses.count(429)


@pytest.mark.skipif(not PROMTOOL, reason="promtool not installed (Debian's prometheus package)")
def test_the_api_exposition_passes_promtool(api_server):
    status, text = get(api_server, "/metrics", ADMIN_KEY, "127.0.0.4")
    assert status == 200 and "hydraserve_instances" in text
    assert promtool_problems(text) == []
