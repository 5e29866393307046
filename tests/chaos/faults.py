"""How the chaos suite applies a fault and judges it: two tenants' steady load, the fault, more
load, then every accepted invocation followed to its end (and every invocation the platform
accepted whose id never reached its client, followed in Postgres), one RESULTS row each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import requests

from tests.chaos.load import Client, Load, Tally
from tests.e2e.serving_cluster import Cluster

FULL = os.environ.get("HYDRA_CHAOS") == "full"
WARMUP_S, AFTER_S = 3.0, 15.0 if not FULL else 20.0
RECOVERY_BOUND_S = 60.0
SETTLE_S = 240.0
PROBE = "probe"  # the victim when a fault is timed by a cold-start client of its own
FINISHED = ("succeeded", "failed", "cancelled")
RESULTS: list[dict] = []


def settle(cluster: Cluster, key: str, ids: list[str], deadline_s: float = SETTLE_S) -> dict:
    """Each accepted invocation's final status, waiting for the ones still running."""
    end, out = time.monotonic() + deadline_s, {}
    headers = {"Authorization": f"Bearer {key}"}
    pending = list(dict.fromkeys(ids))
    while pending and time.monotonic() < end:
        still = []
        for inv_id in pending:
            got = requests.get(f"{cluster.base}/v1/invocations/{inv_id}", headers=headers,
                               timeout=30).json()
            if got.get("status") in FINISHED:
                out[inv_id] = got
            else:
                still.append(inv_id)
        pending = still
        if pending:
            time.sleep(1.0)
    return out


def settle_unacknowledged(cluster: Cluster, tenants: list[str], since: datetime,
                          acknowledged: set[str], deadline_s: float = SETTLE_S) -> tuple[int, int]:
    """Invocations of ``tenants`` the platform accepted since ``since`` whose id never reached
    a client (its connection died first): (how many, how many never finished)."""
    sql = ("SELECT i.id, i.status FROM invocations i JOIN tenants t ON t.id = i.tenant_id "
           "WHERE t.name = ANY(:names) AND i.queued_at >= :since")
    end = time.monotonic() + deadline_s
    while True:
        rows = [r for r in cluster.query(sql, names=tenants, since=since)
                if r.id not in acknowledged]
        unfinished = [r.id for r in rows if r.status not in FINISHED]
        if not unfinished or time.monotonic() > end:
            return len(rows), len(unfinished)
        time.sleep(1.0)


def run_fault(cluster: Cluster, tenants: dict[str, str], name: str,
              fault: Callable[[], dict | None],
              victim: str = "admin", functions: dict[str, str] | None = None,
              probe: tuple[str, str] | None = None) -> dict:
    """Load, the fault, more load; then every accepted invocation's end. Each tenant's clients
    invoke ``functions[tenant]`` ("svc" by default). ``probe`` (tenant, function): one more
    sync client, started right after the fault (a cold start that meets it). Recovery: from
    the fault to the first answer the victim got of a success recorded after the fault (an
    answer that comes late of a request done before the fault does not count). What
    ``fault`` returns (a dict, filled while the load goes on) joins the row."""
    functions = functions or {}
    wait_settled(cluster)
    tallies = {t: Tally() for t in [*tenants, *([PROBE] if probe else [])]}
    keys = dict(tenants) | ({PROBE: tenants[probe[0]]} if probe else {})
    clients = [Client(cluster.base, key, functions.get(t, "svc"), stream, tallies[t])
               for t, key in tenants.items() for stream in (False, False, True)]
    since = datetime.now(UTC)
    load = Load(clients).start()
    time.sleep(WARMUP_S)
    fault_at = time.time()
    extra = fault()  # filled later, maybe: keep this very dict
    late = Load([Client(cluster.base, keys[PROBE], probe[1], False, tallies[PROBE])]).start() \
        if probe else None
    time.sleep(AFTER_S)
    load.stop()
    if late is not None:
        late.stop()
    row, finals = tally_row(cluster, name, tenants, keys, tallies, since)
    row["load"] += f" + 1 cold-start client of {probe[1]}" if probe else ""
    recovered = [got for _sent, got, status, inv_id in tallies[victim].answers
                 if status == "succeeded" and finished_at(finals[victim].get(inv_id)) > fault_at]
    row["recovery_s"] = round(min(recovered) - fault_at, 2) if recovered else None
    row |= extra or {}
    if os.environ.get("HYDRA_CHAOS_DEBUG"):
        for tenant, tally in tallies.items():
            print(tenant, [(round(s - fault_at, 1), round(g - fault_at, 1), st)
                           for s, g, st, _ in tally.answers if g >= fault_at][:40],
                  file=sys.stderr)
    RESULTS.append(row)
    print(json.dumps(row), file=sys.stderr)
    return row


def wait_settled(cluster: Cluster, timeout_s: float = 180.0) -> None:
    """Every up node has its pre-started worker booted again (refilled after the last
    fault's cold starts), so each fault meets the cluster in the same state."""
    cluster.wait_for(lambda: all(
        (r.info or {}).get("idle_workers", 0) >= 1 for r in cluster.query(
            "SELECT info FROM nodes WHERE status = 'up'")), timeout_s,
        "every node's pre-started worker", every_s=1.0)


def finished_at(inv: dict | None) -> float:
    """When an invocation's outcome was recorded (time.time() scale; 0 when unknown)."""
    when = ((inv or {}).get("timings") or {}).get("finished_at")
    return datetime.fromisoformat(when).timestamp() if when else 0.0


def tally_row(cluster: Cluster, name: str, tenants: dict[str, str], keys: dict[str, str],
              tallies: dict[str, Tally], since: datetime) -> tuple[dict, dict[str, dict]]:
    """The row, and each client group's finished invocations by id."""
    row = {"fault": name, "load": f"{len(tenants)} tenants x (2 sync + 1 streaming) clients",
           "accepted": 0, "succeeded": 0, "failed_recorded": 0, "cancelled": 0, "lost": 0,
           "duplicated_tokens": 0, "refused": 0, "client_errors": 0}
    acknowledged: set[str] = set()
    finals: dict[str, dict] = {}
    for who, tally in tallies.items():
        ids = set(tally.accepted)
        final = finals[who] = settle(cluster, keys[who], list(ids))
        acknowledged |= ids
        row["accepted"] += len(ids)
        row["succeeded"] += sum(f["status"] == "succeeded" for f in final.values())
        row["failed_recorded"] += sum(f["status"] == "failed" and bool(f["error"]["message"])
                                      for f in final.values())
        row["cancelled"] += sum(f["status"] == "cancelled" for f in final.values())
        row["lost"] += len(ids) - len(final)
        row["duplicated_tokens"] += tally.duplicated_tokens
        row["refused"] += tally.refused
        row["client_errors"] += sum(a[2].startswith("client error") for a in tally.answers)
    row["unacknowledged"], row["unacknowledged_unfinished"] = settle_unacknowledged(
        cluster, list(tenants), since, acknowledged)
    return row, finals


def check(row: dict, bound_s: float = RECOVERY_BOUND_S) -> None:
    assert row["lost"] == 0, row
    assert row["unacknowledged_unfinished"] == 0, row
    assert row["duplicated_tokens"] == 0, row
    assert row["accepted"] == row["succeeded"] + row["failed_recorded"], row
    assert row["recovery_s"] is not None and row["recovery_s"] < bound_s, row


def write_results() -> None:
    if RESULTS and os.environ.get("HYDRA_CHAOS_RESULTS"):
        Path(os.environ["HYDRA_CHAOS_RESULTS"]).write_text(json.dumps(RESULTS, indent=2))


# ---- where the faults go -----------------------------------------------------------------

def stage_of(cluster: Cluster, tenant: str, function: str = "svc", stage: int = 0) -> tuple:
    """(pid, node id, number of stages) of a ready stage of the group serving the function."""
    rows = cluster.query(
        "SELECT i.pid, i.node_id, i.num_stages FROM instances i JOIN function_versions v "
        "ON v.id = i.function_version_id JOIN functions f ON f.id = v.function_id JOIN tenants "
        "t ON t.id = f.tenant_id WHERE t.name = :t AND f.name = :f AND i.status = 'ready' AND "
        "i.stage_index = :stage AND i.pid IS NOT NULL ORDER BY i.id DESC",
        t=tenant, f=function, stage=stage)
    assert rows, f"no ready stage {stage} of {tenant}'s {function}"
    return rows[0].pid, rows[0].node_id, rows[0].num_stages


def starts_of(cluster: Cluster, tenant: str, function: str) -> list:
    """Every instance started for the function: (node id, status, error), oldest first."""
    return cluster.query(
        "SELECT i.node_id, i.status, i.error FROM instances i JOIN function_versions v ON v.id "
        "= i.function_version_id JOIN functions f ON f.id = v.function_id JOIN tenants t ON "
        "t.id = f.tenant_id WHERE t.name = :t AND f.name = :f ORDER BY i.id", t=tenant, f=function)


def child_pids(parent: int) -> list[int]:
    """The live children of ``parent`` (a gunicorn master's workers)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return sorted(out)


def watch_node_down(cluster: Cluster, node_id: str, since: float) -> dict:
    """Polls the node's status from a thread; ``result["node_down_s"]`` is set once it is
    down, counted from ``since`` (time.time())."""
    result: dict = {}

    def poll() -> None:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if cluster.query("SELECT status FROM nodes WHERE id = :n", n=node_id)[0].status \
                    == "down":
                result["node_down_s"] = round(time.time() - since, 2)
                return
            time.sleep(0.1)

    threading.Thread(target=poll, daemon=True, name="watch-node").start()
    return result


def restart_postgres() -> None:
    """Restarts the machine's PostgreSQL cluster as its service notes say (pg_ctlcluster)."""
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                   check=True, timeout=120, capture_output=True)


def ensure_services(repo_root: Path) -> None:
    """PostgreSQL and RabbitMQ answer again (started when they do not)."""
    subprocess.run([str(repo_root / "scripts" / "ensure-services.sh")], check=True, timeout=180,
                   capture_output=True)


def invoke_output(cluster: Cluster, key: str, inv_id: str) -> list[int]:
    got = requests.get(f"{cluster.base}/v1/invocations/{inv_id}",
                       headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    assert got["status"] == "succeeded", got
    return got["output"]["token_ids"]
