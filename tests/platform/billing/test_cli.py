"""``hydraserve admin prices`` and ``hydraserve billing report``, on the test's transaction."""

from __future__ import annotations

import importlib

import pytest
from click.testing import CliRunner

from hydraserve.cli import main

WINDOW = ["--from", "2026-01-01", "--to", "2026-01-03"]


@pytest.fixture
def cli(monkeypatch, session_factory):
    """Runs ``hydraserve ...`` with its database sessions on the test's transaction."""
    for module in ("hydraserve.cli.admin", "hydraserve.cli.billing"):  # the modules, not the
        monkeypatch.setattr(importlib.import_module(module), "session", session_factory)  # groups
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        out = runner.invoke(main, list(args))
        assert (out.exit_code == 0) == ok, out.output
        return out.output

    return run


def test_prices_add_list_and_refuse(cli):
    out = cli("admin", "prices", "add", "cpu", "0.000001", "--from", "2026-01-01")
    assert [line.split()[1:] for line in out.splitlines()] == [
        ["kind", "usd_per_gb_second", "from", "to", "status"],
        ["cpu", "0.0000010000", "2026-01-01T00:00:00Z", "-", "in_force"]]
    cli("admin", "prices", "add", "cpu", "0.000002", "--from", "2099-01-01T00:00:00Z")
    listed = [line.split()[1:] for line in cli("admin", "prices", "list").splitlines()[1:]]
    assert listed == [["cpu", "0.0000010000", "2026-01-01T00:00:00Z", "2099-01-01T00:00:00Z",
                       "in_force"],
                      ["cpu", "0.0000020000", "2099-01-01T00:00:00Z", "-", "scheduled"]]
    overlap = cli("admin", "prices", "add", "cpu", "0.000003", "--from", "2098-01-01", ok=False)
    assert "overlaps price" in overlap
    assert "is not a price" in cli("admin", "prices", "add", "cpu", "1e-6", "--from",
                                   "2099-02-01", ok=False)
    assert "no UTC offset" in cli("admin", "prices", "add", "cpu", "0.1", "--from",
                                  "2099-02-01T00:00:00", ok=False)


def test_billing_report_prints_the_apis_figures(cli, bill, acme, client, admin):
    bill.price("cpu", "0.000001", "2026-01-01T00:00:00Z")
    fv = bill.function(acme, "chat")
    # 2 GB from 23:00 to 01:00: 7200 GB-s a day, 0.0072 USD each
    bill.record(fv, "cpu", "2", "2026-01-01T23:00:00Z", "2026-01-02T01:00:00Z")
    table = cli("billing", "report", *WINDOW, "--group-by", "tenant,day").splitlines()
    assert [line.split() for line in table[:4]] == [
        ["tenant", "day", "gb_seconds", "unpriced_gb_seconds", "cost_usd", "open"],
        ["acme", "2026-01-01", "7200.000000", "0.000000", "0.007200"],
        ["acme", "2026-01-02", "7200.000000", "0.000000", "0.007200"],
        ["total", "14400.000000", "0.000000", "0.014400"]]
    csv_text = cli("billing", "report", *WINDOW, "--group-by", "tenant,day", "--csv")
    api = client.get("/v1/billing/usage", headers=admin, query_string={
        "from": "2026-01-01", "to": "2026-01-03", "group_by": "tenant,day", "format": "csv"})
    assert csv_text == api.get_data(as_text=True).replace("\r\n", "\n")  # click's output
    # has its line ends made \n; stdout gets the csv module's \r\n as the API does
    assert "'week' is not a grouping" in cli("billing", "report", *WINDOW, "--group-by",
                                             "week", ok=False)
