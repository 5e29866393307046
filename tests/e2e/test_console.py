"""The admin console in a real headless chromium against the API served by gunicorn: login
as an admin and as a tenant, every page's values, the charts drawn, isolation by 404, logout,
CSRF. Screenshots go to the test's output folder (and to docs/console/ with
HYDRA_CONSOLE_DOCS_SHOTS=1)."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY, REPO_ROOT
from tests.e2e.console_seed import Seed, seed

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.e2e, pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                       "(apt-get install -y chromium; `make venv` does it where apt-get runs)"),
]
DOCS_SHOTS = REPO_ROOT / "docs" / "console"
WINDOW = "from=2026-11-01&to=2026-11-04"


@pytest.fixture(scope="module")
def data(api_server, e2e_env, store_root) -> Seed:
    from hydraserve.db import make_engine, make_session_factory
    from hydraserve.settings import Settings

    settings = Settings(database_url=e2e_env["HYDRA_DATABASE_URL"], store_root=str(store_root))
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return seed(session, settings)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("console-screenshots")


@pytest.fixture
def page(browser, api_server, data):
    context = browser.new_context(base_url=api_server, viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def snap(page, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("HYDRA_CONSOLE_DOCS_SHOTS") == "1":
        DOCS_SHOTS.mkdir(exist_ok=True)
        shutil.copy(path, DOCS_SHOTS / path.name)


def login(page, key: str) -> None:
    page.goto("/console/login")
    page.fill("input[name=key]", key)
    page.click("form.login button")
    page.wait_for_url("**/console/cluster")


def cells(page, selector: str) -> list[list[str]]:
    return page.eval_on_selector_all(
        f"{selector} tbody tr",
        "rows => rows.map(r => [...r.cells].map(c => c.textContent.trim()))")


def test_login_page_refuses_a_bad_key(page, shots):
    page.goto("/console/cluster")
    assert "/console/login" in page.url  # no session: to the login
    page.fill("input[name=key]", "hs_not-a-key-at-all")
    page.click("form.login button")
    assert "invalid API key" in page.text_content("p.error")
    snap(page, shots, "login")


def test_admin_overview_shows_nodes_devices_and_live_groups(page, shots, e2e_env):
    login(page, ADMIN_KEY)
    assert page.text_content("#who") == "admin (admin)"
    nodes = cells(page, "#nodes")
    assert nodes[0][:2] == ["node-a", "up"]
    # its link (cap, bytes fetched, last fetches' rate) and its cache's contents
    assert cells(page, "#links")[0] == ["node-a", "800 Mb/s", "3.0 MiB", "95.50 MB/s",
                                        "m1-0123abcd/0"]
    assert [r[3:] for r in nodes] == [["0", "cpu", "8,192.0 MiB", "1,024.0 MiB", "7,168.0 MiB"],
                                      ["1", "cpu", "8,192.0 MiB", "0.0 MiB", "8,192.0 MiB"]]
    (group,) = cells(page, "#groups")
    assert group[1:5] == ["acme", "chat", "2", "standalone"]
    assert "node-a" in group[5] and "1,024.0 MiB" in group[5] and "ready" in group[5]
    snap(page, shots, "overview")

    # live refresh: a node registered now appears without a reload
    from hydraserve.cluster.service import DeviceSpec, register
    from hydraserve.db import make_engine, make_session_factory

    engine = make_engine(e2e_env["HYDRA_DATABASE_URL"])
    with make_session_factory(engine)() as session:
        register(session, "node-b", "127.0.0.1", None, [DeviceSpec(0, "cpu", 4 << 30)], {})
    engine.dispose()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#nodes tbody td')].some(td => td.textContent === 'node-b')",
        timeout=15_000)
    assert any(r[0] == "node-b" and r[5] == "4,096.0 MiB" for r in cells(page, "#nodes"))
    # the links table is redrawn from the same poll
    assert ["node-b", "uncapped", "0.0 MiB", "none yet", "empty"] in cells(page, "#links")


def test_admin_functions_lists_every_tenant_with_ttft_against_the_slo(page, shots):
    login(page, ADMIN_KEY)
    page.goto("/console/functions")
    rows = {(r[0], r[1]): r for r in cells(page, "#functions")}
    assert set(rows) == {("acme", "chat"), ("globex", "secret-fn")}
    chat = rows["acme", "chat"]
    # alias v2 (SLO 800 ms); TTFTs 1000, 50, 60, 70, 2000: p50 70, p90 and p99 2000, 3 of 5 met
    assert chat[2:] == ["v2", "v2", "800 ms", "200 ms", "5", "70.0 ms", "2,000.0 ms",
                        "2,000.0 ms", "60%"]
    snap(page, shots, "functions")
    page.click("text=chat")
    page.wait_for_url("**/console/functions/acme/chat")
    versions = cells(page, "#versions")
    assert [r[0] for r in versions] == ["v1", "v2 (alias)"]
    # each decoded its 8 tokens in 500 ms after the first: 500 / 7 ms per token, SLO 200 ms
    assert cells(page, "#tpot") == [["5", "71.4 ms", "71.4 ms", "71.4 ms", "100%"]]
    assert [r[2] for r in versions] == ["1000 ms", "800 ms"]
    assert cells(page, "#ttft") == [["5", "70.0 ms", "2,000.0 ms", "2,000.0 ms", "60%"]]
    invs = {r[0]: r for r in cells(page, "#invocations")}
    assert invs["inv-cold-1"][3] == "cold" and invs["inv-cold-1"][5] == "1,000.0 ms"
    assert invs["inv-warm-1"][3] == "warm" and invs["inv-warm-1"][5] == "50.0 ms"
    snap(page, shots, "function")


def test_invocation_page_draws_its_timeline(page, shots, data):
    login(page, ADMIN_KEY)
    page.goto(f"/console/invocations/{data.cold_id}")
    assert page.text_content("#cold") == "cold"
    assert page.text_content("#ttft").startswith("1,000.0 ms (SLO 800 ms, missed")
    # beside it, what the group's plan predicted (the seed's plan: 0.5 s)
    assert page.text_content("#predicted").startswith("500.0 ms (the TTFT the scheduler")
    phases = cells(page, "#phases")
    # plan 100, fetch 500, load 300, prefill 100, decode 500 ms after queueing
    assert phases[0] == ["invocation", "0.0 ms", "100.0 ms", "500.0 ms", "300.0 ms",
                         "100.0 ms", "500.0 ms"]
    # stage 0: planned 100 ms after the queueing, fetching from 150 to 600 ms, ready at 950
    assert phases[1] == ["stage 0", "100.0 ms", "50.0 ms", "450.0 ms", "350.0 ms", "50.0 ms",
                         "0.0 ms"]
    page.wait_for_selector("#timeline-chart svg")
    # one bar per row (invocation, stage 0) for the offset and each of the five phases
    assert page.locator("#timeline-chart line.ct-bar").count() == 2 * 6
    fetch_bars = page.eval_on_selector_all(
        "#timeline-chart .ct-series-phase-2 line.ct-bar",
        "bars => bars.map(b => b.x2.baseVal.value - b.x1.baseVal.value)")
    assert len(fetch_bars) == 2 and all(w > 10 for w in fetch_bars), fetch_bars  # drawn wide
    snap(page, shots, "invocation")
    page.goto(f"/console/invocations/{data.warm_id}")
    assert page.text_content("#cold") == "warm"
    assert cells(page, "#phases") == [["invocation", "0.0 ms", "0.0 ms", "0.0 ms", "0.0 ms",
                                       "50.0 ms", "500.0 ms"]]


def test_billing_charts_table_and_csv(page, shots):
    login(page, ADMIN_KEY)
    page.goto(f"/console/billing?{WINDOW}")
    page.wait_for_selector("#cost-chart svg")
    # three UTC days in the window: one bar each, in both charts
    assert page.locator("#gb-chart line.ct-bar").count() == 3
    assert page.locator("#cost-chart line.ct-bar").count() == 3
    rows = cells(page, "#usage")
    assert [r[:6] for r in rows] == [
        ["acme", "chat", "2026-11-01", "7200.000000", "0.000000", "0.007200"],
        ["acme", "chat", "2026-11-02", "1800.000000", "0.000000", "0.001800"],
        ["globex", "secret-fn", "2026-11-01", "1000.000000", "0.000000", "0.001000"]]
    assert page.text_content("#total-cost") == "0.010000"
    snap(page, shots, "billing")
    href = page.get_attribute("#csv", "href")
    assert href.startswith("/console/billing/usage.csv?")
    resp = page.request.get(href)  # the page's own cookies, no bearer key
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(resp.text())))
    assert table[0] == ["tenant", "function", "function_deleted_at", "day", "gb_seconds",
                        "unpriced_gb_seconds", "cost_usd", "open"]
    assert table[1] == ["acme", "chat", "", "2026-11-01", "7200.000000", "0.000000",
                        "0.007200", "false"]
    assert len(table) == 4


def test_prices_page_adds_a_price_and_shows_a_conflict(page, shots):
    login(page, ADMIN_KEY)
    page.goto("/console/prices")
    assert [r[1:3] for r in cells(page, "#prices")] == [["cpu", "0.0000010000"]]
    page.fill("input[name=device_kind]", "cuda")
    page.fill("input[name=usd_per_gb_second]", "0.0000012")
    page.fill("input[name=effective_from]", "2027-01-01")
    page.click("form.price button")
    page.wait_for_selector("p.flash.info")
    assert "Added price" in page.text_content("p.flash.info")
    rows = cells(page, "#prices")
    assert [r[1:6] for r in rows if r[1] == "cuda"] == [
        ["cuda", "0.0000012000", "2027-01-01T00:00:00Z", "open-ended", "scheduled"]]
    snap(page, shots, "prices")
    # the same start again overlaps: 409, the message on the page, the form kept
    page.fill("input[name=device_kind]", "cuda")
    page.fill("input[name=usd_per_gb_second]", "0.000002")
    page.fill("input[name=effective_from]", "2027-01-01")
    with page.expect_response(lambda r: r.url.endswith("/console/prices")) as answer:
        page.click("form.price button")
    assert answer.value.status == 409
    assert "overlaps price" in page.text_content("p.error")
    assert page.input_value("input[name=usd_per_gb_second]") == "0.000002"


def test_tenant_sees_only_its_own_and_tampered_urls_are_404(page, shots, data):
    login(page, data.acme_key)
    assert page.text_content("#who") == "acme (tenant)"
    assert page.locator("#nodes").count() == 0  # nodes are for admins
    assert [r[1:3] for r in cells(page, "#groups")] == [["acme", "chat"]]
    assert page.locator("header nav a", has_text="Prices").count() == 0
    page.goto("/console/functions")
    assert [(r[0], r[1]) for r in cells(page, "#functions")] == [("acme", "chat")]
    page.goto(f"/console/billing?{WINDOW}")
    assert {r[0] for r in cells(page, "#usage")} == {"acme"}
    assert page.text_content("#total-cost") == "0.009000"
    snap(page, shots, "tenant-billing")
    for url in ("/console/functions/globex/secret-fn", f"/console/invocations/{data.globex_id}",
                f"/console/billing?{WINDOW}&tenant=globex",
                f"/console/billing/usage.csv?{WINDOW}&tenant=globex"):
        resp = page.goto(url)
        assert resp.status == 404, url
        if not url.endswith(".csv") and "usage.csv" not in url:
            assert "not found" in page.text_content("p.error"), url
    snap(page, shots, "not-found")
    assert page.goto("/console/prices").status == 403
    assert page.goto(f"/console/invocations/{data.cold_id}").status == 200  # its own


def test_logout_ends_the_session(page, data):
    login(page, data.acme_key)
    page.click("form.logout button")
    page.wait_for_url("**/console/login")
    assert "Logged out" in page.text_content("p.flash")
    resp = page.goto("/console/functions")
    assert "/console/login" in page.url and resp.status == 200
    assert page.locator("#functions").count() == 0
    assert page.request.get("/console/api/cluster").status == 401


def test_a_post_without_the_csrf_token_is_refused(page, data):
    login(page, ADMIN_KEY)
    form = {"device_kind": "tpu", "usd_per_gb_second": "0.1", "effective_from": "2027-01-01"}
    assert page.request.post("/console/prices", form=form).status == 403
    assert page.request.post("/console/prices", form=form | {"csrf_token": "forged"}).status == 403
    page.goto("/console/prices")
    assert "tpu" not in [r[1] for r in cells(page, "#prices")]
    token = page.get_attribute("form.price input[name=csrf_token]", "value")
    assert re.fullmatch(r"[\w-]{40,}", token)
    assert page.request.post("/console/prices", form=form | {"csrf_token": token}).status == 200
    assert page.request.post("/console/logout").status == 403  # logout is a form too


def test_session_cookie_flags(page, data):
    login(page, data.acme_key)
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "hydra_console"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/console" and cookie["secure"] is False  # plain http here
    assert data.acme_key not in cookie["value"]
