"""What a node agent reports of its link in its heartbeat info (the console's links table)."""

from __future__ import annotations

from gpu_runtime.store.link import FetchStats, NodeLink
from hydraserve.tasks.node.agent import link_use


def test_link_use_is_the_bytes_since_start_and_the_last_fetches_rate():
    link = NodeLink("n1")
    assert link_use(link) == {"link_bytes": 0, "link_mb_per_s": None,
                              "link_bandwidth_mb_per_s": None}
    for _ in range(10):  # 10 fetches of 2 MB in 0.5 s each; the rate reads the last 8
        link.record(FetchStats(2_000_000, 0.5))
    link.record(FetchStats(1_000_000, 1.0))
    # last 8: 7 x (2 MB, 0.5 s) + (1 MB, 1 s) = 15 MB in 4.5 s
    # none of 8 MiB or more: the planner's bandwidth is not measured yet
    assert link_use(link) == {"link_bytes": 21_000_000, "link_mb_per_s": round(15 / 4.5, 2),
                              "link_bandwidth_mb_per_s": None}
    link.record(FetchStats(40_000_000, 2.0))
    link.record(FetchStats(1_000_000, 1.0))  # small: counts for the rate shown, not this
    assert link_use(link)["link_bandwidth_mb_per_s"] == 20.0
