"""``GET /v1/billing/usage``: who sees what, JSON and CSV that agree, clear 400s."""

from __future__ import annotations

import csv
import io
from datetime import date, timedelta
from decimal import Decimal

import pytest

USAGE = "/v1/billing/usage"
WINDOW = {"from": "2026-01-01T00:00:00Z", "to": "2026-01-03T00:00:00Z"}


@pytest.fixture
def two_tenants(bill, acme, make_tenant):
    """acme: chat, 2 GB of cpu over UTC midnight (23:00 .. 01:00), and a deleted function
    with 1 GB of cuda for 100 s; globex: 4 GB of cpu for 15 minutes. cpu 0.000001 USD per
    GB-second, cuda 0.00005."""
    globex = make_tenant("globex")
    bill.price("cpu", "0.000001", "2026-01-01T00:00:00Z")
    bill.price("cuda", "0.00005", "2026-01-01T00:00:00Z")
    chat, gone = bill.function(acme, "chat"), bill.function(acme, "gone")
    bill.record(chat, "cpu", "2", "2026-01-01T23:00:00Z", "2026-01-02T01:00:00Z")
    bill.record(gone, "cuda", "1", "2026-01-02T10:00:00Z", "2026-01-02T10:01:40Z")
    assert bill.client.delete("/v1/functions/gone", headers=acme).status_code == 200
    bill.record(bill.function(globex, "chat"), "cpu", "4", "2026-01-02T00:00:00Z",
                "2026-01-02T00:15:00Z")
    return acme, globex


def rows(resp) -> list[tuple]:
    assert resp.status_code == 200, resp.json
    return [tuple(r.get(k) for k in ("tenant", "function", "day", "gb_seconds", "cost_usd"))
            for r in resp.json["data"]]


def test_an_admin_sees_every_tenant_and_a_tenant_only_its_own(client, admin, two_tenants):
    acme, globex = two_tenants
    # acme chat: 3600 s x 2 GB = 7200 GB-s a day = 0.0072; gone: 100 GB-s x 0.00005 = 0.005;
    # globex: 900 s x 4 GB = 3600 GB-s = 0.0036
    everyone = [("acme", "chat", "2026-01-01", "7200.000000", "0.007200"),
                ("acme", "chat", "2026-01-02", "7200.000000", "0.007200"),
                ("acme", "gone", "2026-01-02", "100.000000", "0.005000"),
                ("globex", "chat", "2026-01-02", "3600.000000", "0.003600")]
    assert rows(client.get(USAGE, query_string=WINDOW, headers=admin)) == everyone
    assert rows(client.get(USAGE, query_string=WINDOW, headers=acme)) == everyone[:3]
    assert rows(client.get(USAGE, query_string=WINDOW | {"tenant": "acme"},
                           headers=acme)) == everyone[:3]
    assert rows(client.get(USAGE, query_string=WINDOW, headers=globex)) == everyone[3:]
    assert rows(client.get(USAGE, query_string=WINDOW | {"tenant": "globex"},
                           headers=admin)) == everyone[3:]
    body = client.get(USAGE, query_string=WINDOW | {"group_by": "tenant"}, headers=admin).json
    assert [(r["tenant"], r["gb_seconds"], r["cost_usd"]) for r in body["data"]] == [
        ("acme", "14500.000000", "0.019400"), ("globex", "3600.000000", "0.003600")]
    assert body["total"] == {"gb_seconds": "18100.000000", "unpriced_gb_seconds": "0.000000",
                             "cost_usd": "0.023000", "open": False}
    assert (body["from"], body["to"], body["group_by"], body["currency"]) == (
        "2026-01-01T00:00:00Z", "2026-01-03T00:00:00Z", ["tenant"], "USD")


def test_another_tenants_name_is_404_as_a_name_that_does_not_exist(client, two_tenants):
    acme, _globex = two_tenants
    theirs = client.get(USAGE, query_string=WINDOW | {"tenant": "globex"}, headers=acme)
    ghost = client.get(USAGE, query_string=WINDOW | {"tenant": "ghost"}, headers=acme)
    assert theirs.status_code == ghost.status_code == 404
    assert theirs.json["error"]["message"].replace("globex", "X") == (
        ghost.json["error"]["message"].replace("ghost", "X"))


def test_a_deleted_function_is_billed_and_says_when_it_was_deleted(client, admin, two_tenants):
    body = client.get(USAGE, query_string=WINDOW | {"group_by": "function"},
                      headers=two_tenants[0]).json
    deleted = {r["function"]: r["function_deleted_at"] for r in body["data"]}
    assert deleted["chat"] is None and deleted["gone"].endswith("Z"), deleted
    assert set(body["data"][0]) == {"function", "function_deleted_at", "gb_seconds",
                                    "unpriced_gb_seconds", "cost_usd", "open"}


def test_csv_parses_and_matches_the_json(client, admin, two_tenants):
    query = WINDOW | {"group_by": "tenant,function,day"}
    data = client.get(USAGE, query_string=query, headers=admin).json["data"]
    resp = client.get(USAGE, query_string=query | {"format": "csv"}, headers=admin)
    assert resp.status_code == 200
    assert resp.mimetype == "text/csv"
    assert resp.headers["Content-Disposition"] == (
        'attachment; filename="hydraserve-usage-2026-01-01T000000Z-2026-01-03T000000Z.csv"')
    parsed = list(csv.reader(io.StringIO(resp.get_data(as_text=True))))
    header, lines = parsed[0], parsed[1:]
    assert header == ["tenant", "function", "function_deleted_at", "day", "gb_seconds",
                      "unpriced_gb_seconds", "cost_usd", "open"]

    def cell(value) -> str:
        return "" if value is None else {True: "true", False: "false"}.get(value, value)

    assert lines == [[cell(row[c]) for c in header] for row in data]
    assert len(lines) == 4 and lines[2][:2] == ["acme", "gone"] and lines[2][2]


def test_an_open_record_is_charged_up_to_now_and_marked_open(client, bill, acme):
    bill.price("cpu", "0.000001", "2026-01-01T00:00:00Z")
    fv = bill.function(acme, "chat")
    bill.record(fv, "cpu", "1", "2026-01-01T00:00:00Z", None)
    # a window that ended before now is final: 1 GB x 86400 s = 86400 GB-s = 0.0864
    day = client.get(USAGE, query_string={"from": "2026-01-01", "to": "2026-01-02",
                                          "group_by": "day"}, headers=acme).json
    assert [(r["gb_seconds"], r["cost_usd"], r["open"]) for r in day["data"]] == [
        ("86400.000000", "0.086400", False)]
    # today's row is charged up to now: still growing, and said so
    today = date.fromisoformat(day["now"][:10])
    live = client.get(USAGE, query_string={"from": str(today), "to": str(today + timedelta(1)),
                                           "group_by": "tenant"}, headers=acme).json
    (row,) = live["data"]
    assert row["open"] is True and live["total"]["open"] is True, row
    assert 0 < Decimal(row["gb_seconds"]) <= 86400, row  # the exact figure: test_report.py


@pytest.mark.parametrize(("query", "param", "words"), [
    ({"group_by": "tenant,week"}, "group_by", "'week' is not a grouping; use a non-empty"
                                              " comma-separated subset of tenant,function,day"),
    ({"group_by": ""}, "group_by", "it is empty"),
    ({"from": "2026-01-03"}, "from", "is not before to"),
    ({"to": "2027-01-03"}, "to", "longer than 366 days"),
    ({"from": None}, "from", "from is required"),
    ({"format": "xlsx"}, "format", "json, csv"),
    ({"to": "2026-01-03T00:00:00"}, "to", "no UTC offset"),
])
def test_bad_queries_are_400_naming_the_parameter(client, acme, query, param, words):
    args = {k: v for k, v in (WINDOW | query).items() if v is not None}
    resp = client.get(USAGE, query_string=args, headers=acme)
    assert resp.status_code == 400, resp.json
    err = resp.json["error"]
    assert err["param"] == param and words in err["message"], err
