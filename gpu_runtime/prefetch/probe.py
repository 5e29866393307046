"""Measures what docs/loading.md quotes about the shared-memory cache on this machine.

    python -m gpu_runtime.prefetch.probe [--mb 512] [--json PATH]

- first-touch writes into fresh tmpfs pages vs writes into the pre-faulted pool;
- a reader's first pass over a fresh mapping of pool pages (minor faults) with and without
  MAP_POPULATE;
- crc32 verification rate;
- cross-process progress-mark wake-up latency, futex vs the polling fallback;
- fetch throughput into the pool from a local HTTP store and from file://.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import zlib

from gpu_runtime.checkpoint import TensorEntry
from gpu_runtime.limits import GB
from gpu_runtime.prefetch import futex
from gpu_runtime.prefetch.cache import BufferCache
from gpu_runtime.prefetch.pool import PoolConfig, ShmPool
from gpu_runtime.store.ranges import plan_stage


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / GB / seconds


def first_touch_vs_prefaulted(nbytes: int) -> dict:
    src = os.urandom(64 << 20)
    path = f"/dev/shm/hydraserve-probe-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes)
        rates = []
        for _ in range(2):  # pass 1 faults every page in; pass 2 writes mapped memory
            started = time.perf_counter()
            for off in range(0, nbytes, len(src)):
                n = min(len(src), nbytes - off)
                mm[off:off + n] = src[:n]
            rates.append(_rate(nbytes, time.perf_counter() - started))
        mm.close()
        return {"first_touch_write_gb_s": rates[0], "prefaulted_write_gb_s": rates[1]}
    finally:
        os.close(fd)
        os.unlink(path)


def reader_first_pass(pool: ShmPool, nbytes: int) -> dict:
    out = {}
    fd = os.open(pool.path, os.O_RDONLY)
    try:
        for name, flags in [("reader_page_touch_gb_s", mmap.MAP_SHARED),
                            ("reader_populate_gb_s", mmap.MAP_SHARED | mmap.MAP_POPULATE)]:
            started = time.perf_counter()
            mm = mmap.mmap(fd, nbytes, flags, mmap.PROT_READ)
            mm[::mmap.PAGESIZE]  # one byte per page: the cost is the minor faults
            out[name] = _rate(nbytes, time.perf_counter() - started)
            mm.close()
    finally:
        os.close(fd)
    out["crc32_gb_s"] = _rate(nbytes, _timed(lambda: zlib.crc32(memoryview(pool.mm)[:nbytes])))
    return out


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _wait_reader(handle_dict: dict, count: int, use_futex: bool, ready, results) -> None:
    from gpu_runtime.prefetch.handle import BufferHandle
    from gpu_runtime.prefetch.reader import open_buffer
    if not use_futex:
        futex.AVAILABLE = False
    buf = open_buffer(BufferHandle.from_dict(handle_dict))
    ready.set()
    woke = []
    for i in range(1, count + 1):
        buf.wait_for(i, timeout_s=10)
        woke.append(time.perf_counter())
    results.put(woke)


def mark_latency(pool: ShmPool, count: int = 200) -> dict:
    """Writer publishes marks 1..count, 2 ms apart; a reader process waits for each."""
    out = {}
    ctx = mp.get_context("spawn")
    for mode in ("futex", "poll"):
        cache = BufferCache(pool)
        layout = plan_stage([TensorEntry("x", "U8", (count,), "f", 0, count)])
        entry = cache.create(f"probe/{mode}", "probe", mode, layout)
        ready, results = ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=_wait_reader, args=(entry.handle.to_dict(), count,
                                                      mode == "futex", ready, results))
        proc.start()
        ready.wait(60)
        published = []
        for i in range(1, count + 1):
            time.sleep(0.002)
            published.append(time.perf_counter())
            entry.header.set_mark(i)
        woke = results.get(timeout=60)
        proc.join(10)
        lat = sorted((w - p) * 1e6 for w, p in zip(woke, published, strict=True))
        out[f"mark_wake_{mode}_median_us"] = statistics.median(lat)
        out[f"mark_wake_{mode}_p99_us"] = lat[int(0.99 * (len(lat) - 1))]
        entry.state = 2  # COMPLETE, so it can be evicted
        cache.evict(entry)
    return out


def fetch_rates(mb: int) -> dict:
    from gpu_runtime.prefetch.prefetcher import PrefetchConfig, Prefetcher
    from gpu_runtime.store.server import running
    out = {}
    with tempfile.TemporaryDirectory() as root:
        data = os.urandom(mb << 20)
        with open(f"{root}/w.bin", "wb") as f:
            f.write(data)
        step = 16 << 20
        entries = [TensorEntry(f"t{i}", "U8", (min(step, len(data) - o),), "w.bin", o,
                               min(step, len(data) - o), zlib.crc32(data[o:o + step]))
                   for i, o in enumerate(range(0, len(data), step))]
        with running(root) as server:
            pf = Prefetcher(PrefetchConfig(node_id=f"probe-{os.getpid()}",
                                           pool_bytes=((mb + 2) << 20) * 2))
            try:
                for name, uri in [("http", server.url), ("file", f"file://{root}")]:
                    stats = pf.prefetch("probe", name, uri, entries).wait(300)
                    out[f"fetch_{name}_mb_s"] = stats.mb_per_s
                out["pool_prefault_gb_s"] = _rate(pf.config.pool_bytes,
                                                  pf.pool.prefault_seconds)
            finally:
                pf.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="bytes moved per measurement (MiB)")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args(argv)
    nbytes = args.mb << 20
    results = first_touch_vs_prefaulted(nbytes)
    pool = ShmPool(PoolConfig(f"/dev/shm/hydraserve-probe-pool-{os.getpid()}", nbytes + (8 << 20)))
    try:
        results |= reader_first_pass(pool, nbytes)
        results |= mark_latency(pool)
    finally:
        pool.close()
    results |= fetch_rates(args.mb)
    results["mb"] = args.mb
    print("| measurement | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
