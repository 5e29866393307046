"""Emulated links: the token bucket caps a node's throughput across all its fetches.

Bounds are generous (timing on a shared 2-core machine); speed targets live in benchmarks.
"""

from __future__ import annotations

import threading
import time

import pytest

from gpu_runtime.store import (
    MB,
    FetchConfig,
    LinkConfig,
    NodeLink,
    TokenBucket,
    fetch_chunks,
    open_reader,
    plan_stage,
    split_chunks,
)


def test_bucket_caps_one_caller():
    bucket = TokenBucket(10 * MB, burst_bytes=100_000)
    started = time.perf_counter()
    for _ in range(20):
        bucket.consume(100_000)  # 2 MB in total, 0.1 MB of it from the initial burst
    elapsed = time.perf_counter() - started
    assert 0.8 * 0.19 <= elapsed <= 0.19 * 2.5, elapsed


def test_bucket_is_shared_by_concurrent_callers():
    bucket = TokenBucket(20 * MB, burst_bytes=50_000)

    def pull():
        for _ in range(10):
            bucket.consume(100_000)

    threads = [threading.Thread(target=pull) for _ in range(4)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    # 4 MB at 20 MB/s: about 0.2 s whatever the number of threads
    assert 0.8 * 0.1975 <= elapsed <= 0.1975 * 2.5, elapsed


def test_uncapped_link_does_not_sleep():
    link = NodeLink("n0")
    started = time.perf_counter()
    for _ in range(1000):
        link.throttle(1 << 20)
    assert link.bucket is None
    assert time.perf_counter() - started < 0.5


def _fetch(link, uri, entries, connections=4):
    layout = plan_stage(entries)
    buf = bytearray(layout.size)
    reader = open_reader(uri)
    stats = fetch_chunks(reader, split_chunks(layout, 256 * 1024), memoryview(buf),
                         config=FetchConfig(connections, 256 * 1024), link=link)
    link.record(stats)
    return stats


def test_node_link_caps_parallel_fetches_and_records_throughput(ckpt_root, ckpt_index):
    uri = f"file://{ckpt_root / 'small'}"
    link = NodeLink("n1", LinkConfig(bandwidth_mb_s=40, burst_bytes=256 * 1024))
    results = []
    halves = [ckpt_index.tensors[::2], ckpt_index.tensors[1::2]]
    threads = [threading.Thread(target=lambda e=e: results.append(_fetch(link, uri, e)))
               for e in halves]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    total = sum(s.bytes for s in results)
    assert total == ckpt_index.total_bytes
    # two fetches, 4 connections each, one 40 MB/s link: the sum is capped, not each fetch
    assert 40 * 0.5 <= total / MB / elapsed <= 40 * 1.15, total / MB / elapsed
    recorded = link.recent()
    assert len(recorded) == 2 and all(s.num_connections == 4 for s in recorded)
    for s in recorded:
        assert s.mb_per_s == pytest.approx(s.bytes / MB / s.seconds)
        assert s.mb_per_s <= 40 * 1.15
        assert s.to_dict()["mb_per_s"] == s.mb_per_s


def test_two_nodes_have_independent_links(ckpt_root, ckpt_index):
    uri = f"file://{ckpt_root / 'small'}"
    a = NodeLink("a", LinkConfig(bandwidth_mb_s=40, burst_bytes=256 * 1024))
    b = NodeLink("b", LinkConfig(bandwidth_mb_s=40, burst_bytes=256 * 1024))
    results = []
    threads = [threading.Thread(target=lambda link=link: results.append(_fetch(link, uri, ckpt_index.tensors)))
               for link in (a, b)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    # each node moves the whole 7.9 MB at its own 40 MB/s: about 0.2 s, not 0.4 s
    # sharing one link would need at least (2 x 7.9 MB - burst) / 40 MB/s = 0.39 s
    assert elapsed < 0.36, elapsed


@pytest.mark.parametrize("kwargs", [dict(bandwidth_mb_s=0), dict(bandwidth_mb_s=-5),
                                    dict(burst_bytes=0)])
def test_link_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="must be > 0"):
        LinkConfig(**kwargs)


def test_a_background_fetch_yields_to_foreground_ones_and_is_no_bandwidth_sample():
    from gpu_runtime.store.link import FetchStats

    link = NodeLink("n", LinkConfig(bandwidth_mb_s=1000.0))
    started, took = threading.Event(), []

    def background() -> None:
        started.set()
        t0 = time.monotonic()
        link.background_throttle(1000)
        took.append(time.monotonic() - t0)

    with link.foreground():  # a cold start's fetch is on the link
        t = threading.Thread(target=background)
        t.start()
        started.wait(5)
        time.sleep(0.3)
        assert not took  # still waiting for the foreground fetch to end
    t.join(5)
    assert took and took[0] >= 0.3 and link.background_wait_s >= 0.3
    link.record(FetchStats(10 << 20, 1.0))
    link.record(FetchStats(10 << 20, 100.0, background=True))  # mostly waiting
    assert link.recent_rate() == (10 << 20) / 1.0
