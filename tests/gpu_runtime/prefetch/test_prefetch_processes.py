"""Worker processes on one node: concurrent readers follow the progress mark, share one copy
of the weights (same tmpfs pages, split Pss), and pin the buffer against eviction."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from gpu_runtime.store import LinkConfig

READER = Path(__file__).with_name("reader_proc.py")
REPO = Path(__file__).resolve().parents[3]


class Reader:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(READER)], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def send(self, obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"reader exited with {self.proc.wait(5)}"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def readers():
    procs = [Reader() for _ in range(3)]
    yield procs
    for r in procs:
        r.close()


def test_readers_in_other_processes_follow_the_mark_and_share_one_copy(
        make_prefetcher, store_server, ckpt_index, readers):
    for r in readers:
        assert r.recv() == {"ready": True}  # torch imported: reading starts with the fetch
    pf = make_prefetcher(link=LinkConfig(bandwidth_mb_s=10))  # about 0.8 s for 7.9 MB
    job = pf.prefetch("small", "all", store_server.url + "/small", ckpt_index.tensors)
    entries = [asdict(t) for t in ckpt_index.tensors]
    for r in readers:
        r.send({"handle": job.handle.to_dict(), "entries": entries})
    results = [r.recv() for r in readers]
    stats = job.wait(30)
    size = job.handle.size

    for res in results:
        seen = res["seen"]
        assert len(seen) == len(ckpt_index.tensors)
        assert all(s["crc_ok"] and s["inside"] for s in seen)
        # the protocol: a tensor is handed out only once the mark has passed its last byte
        assert all(s["mark"] >= s["end"] for s in seen)
        # and the readers really ran alongside the download, not after it
        partial = {s["mark"] for s in seen if s["mark"] < size}
        assert len(partial) >= 3, sorted(partial)
        assert [s["end"] for s in seen] == sorted(s["end"] for s in seen)
    assert stats.num_requests > 0 and stats.bytes == ckpt_index.total_bytes

    for r in readers:
        r.send("measure")
    maps = [r.recv() for r in readers]
    # one copy: every reader maps the same tmpfs file pages ...
    assert len({(m["dev"], m["inode"], m["offset"]) for m in maps}) == 1
    assert maps[0]["inode"] == __import__("os").stat(pf.pool.path).st_ino
    assert maps[0]["offset"] == job.handle.extent_offset
    model_kb = ckpt_index.total_bytes // 1024
    for m, res in zip(maps, results, strict=False):
        assert m["Rss"] >= 0.95 * model_kb  # the whole stage is resident in this reader ...
        # ... but shared: Pss splits it between the prefetcher and the three readers
        assert m["Pss"] <= 0.5 * m["Rss"], m
        assert m["Private_Clean"] + m["Private_Dirty"] == 0, m
        assert res["anon_growth_kb"] < 0.25 * model_kb, res["anon_growth_kb"]

    # the buffer is mapped by three processes: eviction must leave it alone
    job.release()
    assert pf.cache.entries()[0]["readers"] == 3
    assert pf.evict_idle() == 0
    assert len(pf.cache.entries()) == 1
    for r in readers:
        r.send("exit")
        assert r.proc.wait(20) == 0
    assert pf.cache.entries()[0]["readers"] == 0
    assert pf.evict_idle() == 1 and pf.cache.entries() == []
