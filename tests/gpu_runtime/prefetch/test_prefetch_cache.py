"""The shared-memory cache: zero-copy reads equal to a plain load, hits skip the network,
eviction spares buffers in use, stale handles fail loudly."""

from __future__ import annotations

import gc
import glob

import pytest
import torch
from safetensors.torch import load_file

from gpu_runtime.prefetch import (
    BufferGoneError,
    BufferInUseError,
    CacheFullError,
    LayoutMismatchError,
    iter_tensors,
    open_buffer,
)
from gpu_runtime.prefetch.header import DATA_OFFSET
from gpu_runtime.prefetch.locks import count_holders
from gpu_runtime.store import LinkConfig, plan_stage


@pytest.fixture(scope="module")
def reference(ckpt_root):
    tensors = {}
    for f in sorted(glob.glob(str(ckpt_root / "small" / "*.safetensors"))):
        tensors |= load_file(f)
    return tensors


def test_tensors_equal_a_plain_load_bit_for_bit_and_alias_the_cache(
        make_prefetcher, store_server, ckpt_index, reference):
    pf = make_prefetcher()
    job = pf.prefetch("small", "all", store_server.url + "/small", ckpt_index.tensors)
    with open_buffer(job.handle) as buf:
        got = dict(iter_tensors(buf, plan_stage(ckpt_index.tensors), timeout_s=30))
        assert got.keys() == reference.keys()
        lo, hi = buf.address, buf.address + job.handle.size
        for name, t in got.items():
            ref = reference[name]
            assert (t.dtype, t.shape) == (ref.dtype, ref.shape), name
            assert torch.equal(t.view(torch.uint8), ref.view(torch.uint8)), name  # same bits
            assert lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi, name  # inside the map
        assert {t.dtype for t in got.values()} == {torch.bfloat16}
        # aliasing: a write through the prefetcher's mapping shows up in the worker's tensor
        name = "model.norm.weight"
        p = next(p for p in job.layout.placements if p.name == name)
        at = job.handle.extent_offset + DATA_OFFSET + p.buffer_offset
        before = bytes(pf.pool.mm[at:at + 2])
        pf.pool.mm[at:at + 2] = b"\x80\x3f"  # bf16 1.0
        assert got[name][0].item() == 1.0
        pf.pool.mm[at:at + 2] = before
        assert torch.equal(got[name], reference[name])
        with pytest.raises(BufferInUseError, match="still alias"):
            buf.close()
        del got, t
        gc.collect()
    assert count_holders(pf.pool.fd, job.handle.extent_offset) == 0


def test_cache_hit_skips_the_network(make_prefetcher, store_server, ckpt_index):
    pf = make_prefetcher()
    uri = store_server.url + "/small"
    first = pf.prefetch("small", "all", uri, ckpt_index.tensors)
    stats = first.wait(30)
    requests_after_miss = store_server.stats["requests"]
    assert not first.cache_hit and stats.bytes == ckpt_index.total_bytes and stats.num_requests > 0
    second = pf.prefetch("small", "all", uri, ckpt_index.tensors)
    assert second.cache_hit and second.wait(5).cache_hit
    assert second.handle == first.handle
    assert store_server.stats["requests"] == requests_after_miss
    assert pf.cache.counters["hits"] == 1 and pf.cache.counters["misses"] == 1
    assert [s.bytes for s in pf.link.recent()] == [ckpt_index.total_bytes]


def test_concurrent_requests_for_one_stage_share_one_fetch(make_prefetcher, store_server, ckpt_index):
    pf = make_prefetcher(link=LinkConfig(bandwidth_mb_s=40))
    uri = store_server.url + "/small"
    jobs = [pf.prefetch("small", "all", uri, ckpt_index.tensors) for _ in range(3)]
    assert [j.cache_hit for j in jobs] == [False, True, True]
    assert not jobs[0].done  # still downloading at 40 MB/s
    jobs[0].wait(30)
    assert store_server.stats["bytes"] == ckpt_index.total_bytes


def fill(pf, uri, entries, stages):
    jobs = {s: pf.prefetch("small", s, uri, entries) for s in stages}
    for j in jobs.values():
        j.wait(30)
    return jobs


def test_eviction_never_removes_a_buffer_in_use(make_prefetcher, ckpt_root, ckpt_index, reference):
    # each buffer takes an 8 MiB extent: three fit in 24 MiB
    pf = make_prefetcher(pool_bytes=24 << 20)
    uri = f"file://{ckpt_root / 'small'}"
    jobs = fill(pf, uri, ckpt_index.tensors, ["s0", "s1", "s2"])
    reader = open_buffer(jobs["s0"].handle)  # s0 is the least recently used, but mapped
    jobs["s0"].release()
    jobs["s1"].release()  # s1 idle; s2 still pinned by its job
    new = pf.prefetch("small", "s3", uri, ckpt_index.tensors)
    new.wait(30)
    assert sorted(e["stage"] for e in pf.cache.entries()) == ["s0", "s2", "s3"]
    with pytest.raises(BufferGoneError, match="evicted or replaced"):
        open_buffer(jobs["s1"].handle)
    got = dict(iter_tensors(reader, plan_stage(ckpt_index.tensors), timeout_s=5))
    assert all(torch.equal(got[n], reference[n]) for n in reference)  # s0 intact
    # the room the node reports: s0 mapped and s2, s3 pinned leave nothing that fits
    assert pf.cache.room() < 8 << 20
    with pytest.raises(CacheFullError, match="every other entry is in use"):
        pf.prefetch("small", "s4", uri, ckpt_index.tensors)
    jobs["s2"].release()  # idle now: evicting it would give one buffer's extent
    assert pf.cache.room() == 8 << 20
    del got
    reader.close()
    assert pf.prefetch("small", "s4", uri, ckpt_index.tensors).wait(30).bytes > 0  # s0 went
    assert sorted(e["stage"] for e in pf.cache.entries()) == ["s2", "s3", "s4"]
    assert pf.cache.counters["evictions"] == 2


def test_lru_order_among_idle_entries(make_prefetcher, ckpt_root, ckpt_index):
    pf = make_prefetcher(pool_bytes=24 << 20)
    uri = f"file://{ckpt_root / 'small'}"
    for job in fill(pf, uri, ckpt_index.tensors, ["s0", "s1", "s2"]).values():
        job.release()
    pf.prefetch("small", "s0", uri, ckpt_index.tensors).release()  # s0 used again: s1 is LRU
    pf.prefetch("small", "s3", uri, ckpt_index.tensors).wait(30)
    assert [e["stage"] for e in pf.cache.entries()] == ["s2", "s0", "s3"]


def test_forgotten_pin_expires_after_ttl(make_prefetcher, ckpt_root, ckpt_index):
    pf = make_prefetcher(pool_bytes=16 << 20, pin_ttl_s=0.2)
    uri = f"file://{ckpt_root / 'small'}"
    pf.prefetch("small", "s0", uri, ckpt_index.tensors).wait(30)  # never released
    pf.prefetch("small", "s1", uri, ckpt_index.tensors).wait(30)
    with pytest.raises(CacheFullError):
        pf.prefetch("small", "s2", uri, ckpt_index.tensors)
    import time
    time.sleep(0.3)
    pf.prefetch("small", "s2", uri, ckpt_index.tensors).wait(30)
    assert [e["stage"] for e in pf.cache.entries()] == ["s1", "s2"]


def test_buffer_larger_than_pool_is_rejected(make_prefetcher, ckpt_root, ckpt_index):
    pf = make_prefetcher(pool_bytes=4 << 20)
    with pytest.raises(CacheFullError, match="whole pool holds 4194304"):
        pf.prefetch("small", "all", f"file://{ckpt_root / 'small'}", ckpt_index.tensors)


def test_layout_mismatch_is_detected(make_prefetcher, ckpt_root, ckpt_index):
    pf = make_prefetcher()
    job = pf.prefetch("small", "all", f"file://{ckpt_root / 'small'}", ckpt_index.tensors)
    with open_buffer(job.handle) as buf, pytest.raises(LayoutMismatchError, match="same entries"):
        next(iter_tensors(buf, plan_stage(ckpt_index.tensors[1:])))


def test_extents_are_reused_without_growing_the_pool(make_prefetcher, ckpt_root, ckpt_index):
    import os
    pf = make_prefetcher(pool_bytes=16 << 20)
    uri = f"file://{ckpt_root / 'small'}"
    blocks = os.stat(pf.pool.path).st_blocks
    assert blocks * 512 >= 16 << 20  # pre-faulted: every page exists from the start
    for i in range(4):
        job = pf.prefetch("small", f"s{i}", uri, ckpt_index.tensors)
        job.wait(30)
        job.release()
    assert pf.cache.counters["evictions"] >= 2
    assert os.stat(pf.pool.path).st_blocks == blocks


def test_a_live_pool_is_never_taken_over_but_a_dead_one_is(make_prefetcher, tmp_path):
    import os

    from gpu_runtime.prefetch import PoolInUseError
    first = make_prefetcher(node_id="dup-node", pool_bytes=2 << 20)
    with pytest.raises(PoolInUseError, match="own node_id"):
        make_prefetcher(node_id="dup-node", pool_bytes=2 << 20)
    assert os.path.exists(first.pool.path)
    # a pool left behind by a dead agent (no owner lock) is replaced
    stale = tmp_path / "hydraserve-stale.pool"
    stale.write_bytes(b"x" * 4096)
    second = make_prefetcher(node_id="stale", shm_dir=str(tmp_path), pool_bytes=2 << 20)
    assert os.stat(second.pool.path).st_size == 2 << 20


def test_stages_of_one_model_are_separate_buffers(make_prefetcher, store_server, ckpt_index,
                                                  reference):
    pf = make_prefetcher()
    uri = store_server.url + "/small"
    half = len(ckpt_index.tensors) // 2
    stages = {"pp2-s0": ckpt_index.tensors[:half], "pp2-s1": ckpt_index.tensors[half:]}
    jobs = {s: pf.prefetch("small", s, uri, e) for s, e in stages.items()}
    assert not pf.holds("small", "pp2-s0", stages["pp2-s0"]) or jobs["pp2-s0"].done
    for stage, entries in stages.items():
        stats = jobs[stage].wait(30)
        assert stats.bytes == sum(e.length for e in entries)
        assert pf.holds("small", stage, entries)
        with open_buffer(jobs[stage].handle) as buf:
            got = dict(iter_tensors(buf, plan_stage(entries), timeout_s=30))
            assert sorted(got) == sorted(e.name for e in entries)
            assert all(torch.equal(t.view(torch.uint8), reference[n].view(torch.uint8))
                       for n, t in got.items())
            del got
    assert jobs["pp2-s0"].handle.extent_offset != jobs["pp2-s1"].handle.extent_offset
    assert not pf.holds("small", "pp2-s0", ckpt_index.tensors)  # a different split: not cached


def test_handle_into_a_replaced_smaller_pool_is_gone(make_prefetcher, ckpt_root, ckpt_index):
    from dataclasses import replace
    pf = make_prefetcher(pool_bytes=16 << 20)
    job = pf.prefetch("small", "all", f"file://{ckpt_root / 'small'}", ckpt_index.tensors)
    job.wait(30)
    beyond = replace(job.handle, extent_offset=64 << 20)
    with pytest.raises(BufferGoneError, match="no longer holds extent"):
        open_buffer(beyond)
    with pytest.raises(BufferGoneError, match="does not exist"):
        open_buffer(replace(job.handle, pool_path=pf.pool.path + ".missing"))
