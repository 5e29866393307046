"""Usage reports against real Postgres, each figure computed by hand in the test's comment.

Prices in these tests (USD per GB-second): cpu 0.000001 from 2026-01-01T00:00Z, 0.000002 from
2026-01-02T12:00Z on; cuda 0.00005 from 2026-01-01T00:00Z on.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from hydraserve.billing.models import UsageRecord
from hydraserve.cluster import service as cluster
from hydraserve.cluster.service import StageRecord
from hydraserve.errors import InvalidRequest, NotFound
from tests.platform.billing.conftest import NODE, at, figures


@pytest.fixture
def priced(bill):
    bill.price("cpu", "0.000001", "2026-01-01T00:00:00Z")
    bill.price("cpu", "0.000002", "2026-01-02T12:00:00Z")
    bill.price("cuda", "0.00005", "2026-01-01T00:00:00Z")
    return bill


def test_a_record_across_utc_midnight_is_split_into_its_two_days(priced, acme):
    fv = priced.function(acme, "chat")
    # 2 GB from 23:00 to 01:00: 3600 s x 2 GB = 7200 GB-s each day, at 0.000001 = 0.0072
    priced.record(fv, "cpu", "2", "2026-01-01T23:00:00Z", "2026-01-02T01:00:00Z")
    report = priced.report("2026-01-01", "2026-01-03")
    assert figures(report) == [
        ("acme", "chat", "2026-01-01", "7200.000000", "0.000000", "0.007200", False),
        ("acme", "chat", "2026-01-02", "7200.000000", "0.000000", "0.007200", False)]
    assert str(report.total.cost_usd) == "0.014400"
    # without the day, one row: 14400 GB-s, 0.0144
    assert figures(priced.report("2026-01-01", "2026-01-03", "tenant")) == [
        ("acme", "14400.000000", "0.000000", "0.014400", False)]


def test_a_price_change_inside_a_record_charges_each_part_at_its_price(priced, acme):
    fv = priced.function(acme, "chat")
    # 1.5 GB from 11:00 to 13:30 on Jan 2; the price doubles at 12:00:
    # 3600 s x 1.5 = 5400 GB-s at 0.000001 = 0.0054, 5400 s x 1.5 = 8100 GB-s at 0.000002 =
    # 0.0162; together 13500 GB-s, 0.0216
    priced.record(fv, "cpu", "1.5", "2026-01-02T11:00:00Z", "2026-01-02T13:30:00Z")
    assert figures(priced.report("2026-01-02", "2026-01-03")) == [
        ("acme", "chat", "2026-01-02", "13500.000000", "0.000000", "0.021600", False)]


def test_an_open_record_is_charged_up_to_now_and_marked_open(priced, acme):
    fv = priced.function(acme, "chat")
    # 0.5 GB of cuda since 00:00, still held; now = 00:10:00.5: 600.5 s x 0.5 = 300.25 GB-s,
    # x 0.00005 = 0.0150125 USD, which rounds half to even to 0.015012 (half up: 0.015013)
    priced.record(fv, "cuda", "0.5", "2026-01-03T00:00:00Z", None)
    report = priced.report("2026-01-03", "2026-01-04", now="2026-01-03T00:10:00.500000Z")
    assert figures(report) == [
        ("acme", "chat", "2026-01-03", "300.250000", "0.000000", "0.015012", True)]
    assert report.now == at("2026-01-03T00:10:00.5Z") and report.total.open
    # a window that ends before now is final: 3 minutes = 180 s x 0.5 = 90 GB-s = 0.0045
    done = priced.report("2026-01-03T00:00:00Z", "2026-01-03T00:03:00Z",
                         now="2026-01-03T00:10:00.5Z")
    assert figures(done) == [
        ("acme", "chat", "2026-01-03", "90.000000", "0.000000", "0.004500", False)]


def test_a_part_share_released_early_is_charged_until_its_release(priced, acme, db_session):
    """A group of two stages recorded the way the scheduler records one; the part share of
    stage 1 is released by consolidation after 30 minutes, stage 0 holds on for two hours."""
    fv = priced.function(acme, "chat")
    dev = {kind: priced.device(kind).id for kind in ("cpu",)}
    stages = [StageRecord(0, NODE, dev["cpu"], 3 * 10**9, True, 0, 1.0),
              StageRecord(1, NODE, dev["cpu"], 1 * 10**9, False, 0, 1.0)]
    full, part = cluster.record_group(db_session, fv, 2, stages, "test", 1.0, 0.1)
    records = {r.instance_id: r for r in db_session.scalars(select(UsageRecord))}
    records[full.id].started_at = records[part.id].started_at = at("2026-01-04T00:00:00Z")
    records[part.id].ended_at = at("2026-01-04T00:30:00Z")
    records[full.id].ended_at = at("2026-01-04T02:00:00Z")
    db_session.commit()
    # stage 0: 3 GB x 7200 s = 21600 GB-s; stage 1: 1 GB x 1800 s = 1800 GB-s (not 7200);
    # 23400 GB-s at 0.000002 = 0.0468
    assert figures(priced.report("2026-01-04", "2026-01-05")) == [
        ("acme", "chat", "2026-01-04", "23400.000000", "0.000000", "0.046800", False)]


def test_a_deleted_function_is_still_billed(priced, acme, client):
    fv = priced.function(acme, "old")
    # 1 GB for an hour at 0.000002: 3600 GB-s, 0.0072
    priced.record(fv, "cpu", "1", "2026-01-05T00:00:00Z", "2026-01-05T01:00:00Z")
    assert client.delete("/v1/functions/old", headers=acme).status_code == 200
    new = priced.function(acme, "old")  # the name is free again: a different function
    priced.record(new, "cpu", "1", "2026-01-05T02:00:00Z", "2026-01-05T02:30:00Z")
    report = priced.report("2026-01-05", "2026-01-06", "function")
    # the deleted one first (same name, lower id), then the live one: 1800 GB-s, 0.0036
    assert figures(report) == [("old", "3600.000000", "0.000000", "0.007200", False),
                               ("old", "1800.000000", "0.000000", "0.003600", False)]
    deleted = [r.function_deleted_at is not None for r in report.rows]
    assert deleted == [True, False]


def test_memory_held_with_no_price_in_force_is_reported_unpriced(bill, acme):
    bill.price("cpu", "0.000001", "2026-01-01T00:00:00Z")
    fv = bill.function(acme, "chat")
    # 1 GB from 23:59 on Dec 31 (no cpu price yet) to 00:01 on Jan 1: 60 GB-s unpriced on
    # Dec 31, 60 GB-s at 0.000001 = 0.00006 on Jan 1; a kind with no price at all (tpu) is
    # unpriced throughout: 2 GB x 100 s = 200 GB-s
    bill.record(fv, "cpu", "1", "2025-12-31T23:59:00Z", "2026-01-01T00:01:00Z")
    bill.record(fv, "tpu", "2", "2026-01-01T01:00:00Z", "2026-01-01T01:01:40Z")
    assert figures(bill.report("2025-12-31", "2026-01-02")) == [
        ("acme", "chat", "2025-12-31", "60.000000", "60.000000", "0.000000", False),
        ("acme", "chat", "2026-01-01", "260.000000", "200.000000", "0.000060", False)]


def test_two_tenants_are_never_mixed(priced, acme, make_tenant):
    globex = make_tenant("globex")
    mine, theirs = priced.function(acme, "chat"), priced.function(globex, "chat")
    # acme: 2 GB x 1800 s = 3600 GB-s x 0.000002 = 0.0072; globex: 4 GB x 900 s = 3600 GB-s
    # of cuda x 0.00005 = 0.18
    priced.record(mine, "cpu", "2", "2026-01-06T00:00:00Z", "2026-01-06T00:30:00Z")
    priced.record(theirs, "cuda", "4", "2026-01-06T00:00:00Z", "2026-01-06T00:15:00Z")
    assert figures(priced.report("2026-01-06", "2026-01-07", "tenant,function")) == [
        ("acme", "chat", "3600.000000", "0.000000", "0.007200", False),
        ("globex", "chat", "3600.000000", "0.000000", "0.180000", False)]
    assert figures(priced.report("2026-01-06", "2026-01-07", "function")) == [
        ("chat", "3600.000000", "0.000000", "0.007200", False),
        ("chat", "3600.000000", "0.000000", "0.180000", False)]  # two functions, one name
    assert figures(priced.report("2026-01-06", "2026-01-07", "day", tenant="globex")) == [
        ("2026-01-06", "3600.000000", "0.000000", "0.180000", False)]


def test_a_window_clips_records_at_both_ends(priced, acme):
    fv = priced.function(acme, "chat")
    # 1 GB from Jan 1 12:00 to Jan 3 12:00; the window is Jan 2 06:00 .. 18:00: 6 h at
    # 0.000001 (21600 GB-s, 0.0216) and 6 h at 0.000002 (21600 GB-s, 0.0432)
    priced.record(fv, "cpu", "1", "2026-01-01T12:00:00Z", "2026-01-03T12:00:00Z")
    assert figures(priced.report("2026-01-02T06:00:00Z", "2026-01-02T18:00:00Z")) == [
        ("acme", "chat", "2026-01-02", "43200.000000", "0.000000", "0.064800", False)]
    assert figures(priced.report("2026-01-04", "2026-01-05")) == []


@pytest.mark.parametrize(("args", "param", "words"), [
    (("2026-01-02", "2026-01-01", "day"), "from", "is not before to"),
    (("2026-01-01", "2026-01-01", "day"), "from", "is not before to"),
    (("2026-01-01", "2027-01-03", "day"), "to", "longer than 366 days"),
    (("2026-01-01", "2026-01-02", "day,week"), "group_by", "'week' is not a grouping"),
    (("2026-01-01", "2026-01-02", ""), "group_by", "tenant,function,day"),
    (("2026-01-01", "2026-01-02", "day,day"), "group_by", "repeated"),
    (("2026-01-01T00:00:00", "2026-01-02", "day"), "from", "no UTC offset"),
    (("yesterday", "2026-01-02", "day"), "from", "ISO 8601"),
])
def test_bad_queries_are_400_naming_the_parameter(bill, args, param, words):
    with pytest.raises(InvalidRequest) as err:
        bill.report(*args)
    assert err.value.param == param and words in err.value.message, err.value.message


def test_an_unknown_tenant_is_404(bill):
    with pytest.raises(NotFound, match="tenant 'ghost' not found"):
        bill.report("2026-01-01", "2026-01-02", tenant="ghost")
