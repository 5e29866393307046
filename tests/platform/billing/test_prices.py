"""``/v1/admin/prices``: decimal strings in and out, a chain without gaps or overlaps, and
prices that have started are immutable."""

from __future__ import annotations

import pytest

PRICES = "/v1/admin/prices"


@pytest.fixture
def add(client, admin):
    def post(kind: str, usd: str, start: str, end: str | None = None, **extra):
        body = {"device_kind": kind, "usd_per_gb_second": usd, "effective_from": start}
        if end is not None:
            body["effective_to"] = end
        return client.post(PRICES, json=body | extra, headers=admin)

    return post


def listed(client, admin, kind: str = "cpu") -> list[tuple]:
    resp = client.get(PRICES, query_string={"device_kind": kind}, headers=admin)
    assert resp.status_code == 200, resp.json
    return [(p["usd_per_gb_second"], p["effective_from"], p["effective_to"], p["status"])
            for p in resp.json["data"]]


def test_a_price_is_added_and_listed_as_a_decimal_string(client, admin, add):
    resp = add("cpu", "0.0000012", "2099-01-01T00:00:00Z")
    assert resp.status_code == 201, resp.json
    assert resp.json | {"id": 0} == {
        "object": "price", "id": 0, "device_kind": "cpu", "usd_per_gb_second": "0.0000012000",
        "effective_from": "2099-01-01T00:00:00Z", "effective_to": None, "status": "scheduled"}
    # an offset other than Z is the same instant, written in UTC
    assert add("cuda", "0.00005", "2099-01-01T02:00:00+02:00").json["effective_from"] == (
        "2099-01-01T00:00:00Z")
    assert listed(client, admin) == [("0.0000012000", "2099-01-01T00:00:00Z", None, "scheduled")]
    everything = client.get(PRICES, headers=admin).json["data"]
    assert [p["device_kind"] for p in everything] == ["cpu", "cuda"]


@pytest.mark.parametrize(("usd", "words"), [
    (0.0000012, "decimal string"),
    ("0.00000000001", "10 after"),
    ("-0.1", "not negative"),
    ("1e-6", "decimal string of at most"),
    ("1000000", "6 digits before"),
])
def test_a_price_that_is_not_a_short_decimal_string_is_400(add, usd, words):
    resp = add("cpu", usd, "2099-01-01T00:00:00Z")
    assert resp.status_code == 400, resp.json
    err = resp.json["error"]
    assert err["param"] == "usd_per_gb_second" and words in err["message"], err


@pytest.mark.parametrize(("start", "words"), [
    ("2099-01-01T00:00:00", "no UTC offset"),
    ("next week", "ISO 8601"),
    ("1969-12-31T23:59:59Z", "outside"),
])
def test_an_effective_from_that_is_not_a_utc_time_is_400(add, start, words):
    resp = add("cpu", "0.000001", start)
    assert resp.status_code == 400, resp.json
    err = resp.json["error"]
    assert err["param"] == "effective_from" and words in err["message"], err


def test_a_new_price_closes_the_open_one_at_its_start(client, admin, add):
    assert add("cpu", "0.000001", "2099-01-01T00:00:00Z").status_code == 201
    assert add("cpu", "0.000002", "2099-06-01T00:00:00Z").status_code == 201
    assert listed(client, admin) == [
        ("0.0000010000", "2099-01-01T00:00:00Z", "2099-06-01T00:00:00Z", "scheduled"),
        ("0.0000020000", "2099-06-01T00:00:00Z", None, "scheduled")]


def test_an_overlap_is_409_naming_the_price_it_overlaps(client, admin, add):
    first = add("cpu", "0.000001", "2099-01-01T00:00:00Z").json
    for start in ("2098-06-01T00:00:00Z", "2099-01-01T00:00:00Z"):  # before it, at its start
        resp = add("cpu", "0.000002", start)
        assert resp.status_code == 409, resp.json
        err = resp.json["error"]
        assert err["param"] == "effective_from", err
        assert f"overlaps price {first['id']} (cpu, 0.0000010000 USD" in err["message"], err
    assert len(listed(client, admin)) == 1  # nothing changed


def test_a_gap_after_an_ended_price_is_409_and_its_end_is_where_the_next_starts(
        client, admin, add):
    ended = add("cpu", "0.000001", "2099-01-01T00:00:00Z", "2099-02-01T00:00:00Z").json
    gap = add("cpu", "0.000002", "2099-03-01T00:00:00Z")
    assert gap.status_code == 409, gap.json
    assert gap.json["error"]["param"] == "effective_from"
    assert f"leaves a gap after price {ended['id']}" in gap.json["error"]["message"]
    inside = add("cpu", "0.000002", "2099-01-15T00:00:00Z")
    assert inside.status_code == 409 and "overlaps" in inside.json["error"]["message"]
    assert add("cpu", "0.000002", "2099-02-01T00:00:00Z").status_code == 201
    assert [p[1:3] for p in listed(client, admin)] == [
        ("2099-01-01T00:00:00Z", "2099-02-01T00:00:00Z"), ("2099-02-01T00:00:00Z", None)]


def test_an_end_before_the_start_is_400(add):
    resp = add("cpu", "0.000001", "2099-02-01T00:00:00Z", "2099-01-01T00:00:00Z")
    assert resp.status_code == 400 and resp.json["error"]["param"] == "effective_to", resp.json


def test_a_price_that_has_started_is_immutable(client, admin, add):
    # the first price of a kind may start in the past: it prices what was unpriced
    past = add("cpu", "0.000001", "2020-01-01T00:00:00Z").json
    assert past["status"] == "in_force"
    # a new price may not close it in the past ...
    back = add("cpu", "0.000002", "2020-06-01T00:00:00Z")
    assert back.status_code == 409, back.json
    assert "in the past" in back.json["error"]["message"]
    assert f"price {past['id']}" in back.json["error"]["message"]
    # ... nor may it be deleted
    gone = client.delete(f"{PRICES}/{past['id']}", headers=admin)
    assert gone.status_code == 409 and "immutable" in gone.json["error"]["message"], gone.json
    assert listed(client, admin) == [("0.0000010000", "2020-01-01T00:00:00Z", None, "in_force")]
    # a future price closes it from then on; deleting that one opens it again
    later = add("cpu", "0.000002", "2099-01-01T00:00:00Z").json
    assert listed(client, admin)[0][2] == "2099-01-01T00:00:00Z"
    deleted = client.delete(f"{PRICES}/{later['id']}", headers=admin)
    assert deleted.status_code == 200 and deleted.json["id"] == later["id"], deleted.json
    assert listed(client, admin) == [("0.0000010000", "2020-01-01T00:00:00Z", None, "in_force")]


def test_only_the_latest_scheduled_price_may_be_deleted(client, admin, add):
    first = add("cpu", "0.000001", "2099-01-01T00:00:00Z").json
    second = add("cpu", "0.000002", "2099-06-01T00:00:00Z").json
    resp = client.delete(f"{PRICES}/{first['id']}", headers=admin)
    assert resp.status_code == 409, resp.json
    assert f"price {second['id']}" in resp.json["error"]["message"]
    assert client.delete(f"{PRICES}/999999", headers=admin).status_code == 404


def test_prices_need_an_admin_key(client, acme):
    assert client.get(PRICES, headers=acme).status_code == 403
    body = {"device_kind": "cpu", "usd_per_gb_second": "0", "effective_from": "2099-01-01"}
    assert client.post(PRICES, json=body, headers=acme).status_code == 403
