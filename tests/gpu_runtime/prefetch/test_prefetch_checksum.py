"""A corrupted or truncated range is a typed error, and nothing past it is ever served."""

from __future__ import annotations

import shutil
import threading

import pytest

from gpu_runtime.prefetch import ChecksumError, FetchFailedError, iter_tensors, open_buffer
from gpu_runtime.prefetch.header import FAILED
from gpu_runtime.store import LinkConfig, plan_stage
from gpu_runtime.store.server import running


@pytest.fixture
def corrupted(ckpt_root, ckpt_index, tmp_path):
    """A served copy of the checkpoint with one byte flipped in a mid-stage tensor."""
    shutil.copytree(ckpt_root / "small", tmp_path / "small")
    layout = plan_stage(ckpt_index.tensors)
    victim = layout.placements[len(layout.placements) // 2].entry
    with open(tmp_path / "small" / victim.file, "r+b") as f:
        f.seek(victim.offset + victim.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with running(tmp_path) as server:
        yield server, victim, layout


def test_corrupted_range_fails_loudly_and_serves_nothing_past_it(make_prefetcher, corrupted,
                                                                 ckpt_index):
    server, victim, layout = corrupted
    pf = make_prefetcher(link=LinkConfig(bandwidth_mb_s=40))
    job = pf.prefetch("small", "all", server.url + "/small", ckpt_index.tensors)
    served = []
    with open_buffer(job.handle) as buf:
        with pytest.raises(ChecksumError, match=f"{victim.name}.*crc32") as info:
            for name, tensor in iter_tensors(buf, layout, timeout_s=30):
                served.append(name)
                del tensor
        assert buf.progress().state == FAILED
        # a reader that asks again for any tensor, even an early one, gets the error too
        with pytest.raises(ChecksumError):
            next(iter_tensors(buf, layout, timeout_s=5))
    order = [p.name for p in sorted(layout.placements, key=lambda p: p.buffer_end)]
    # only verified tensors, in order, were served; once the buffer failed, nothing more (a
    # slow reader may get fewer than all the tensors verified before the bad one)
    assert len(served) <= order.index(victim.name)
    assert served == order[:len(served)]
    assert victim.name in info.value.message
    with pytest.raises(ChecksumError) as job_error:
        job.wait(30)
    assert job_error.value.tensor == victim.name
    assert job_error.value.expected == victim.crc32 != job_error.value.actual
    assert "small" in pf.bad_models
    # the bad buffer left the cache: a new request fetches again, the extent is reclaimed
    job.release()
    again = pf.prefetch("small", "all", server.url + "/small", ckpt_index.tensors)
    assert not again.cache_hit
    with pytest.raises(ChecksumError):
        again.wait(30)
    pf.cache.reclaim()
    assert pf.pool.free_bytes == pf.config.pool_bytes  # both failed extents reclaimed
    assert pf.cache.entries() == []


def test_waiting_reader_is_woken_by_the_failure(make_prefetcher, corrupted, ckpt_index):
    server, victim, layout = corrupted
    pf = make_prefetcher(link=LinkConfig(bandwidth_mb_s=20))
    job = pf.prefetch("small", "all", server.url + "/small", ckpt_index.tensors)
    errors = []

    def wait_for_last():
        with open_buffer(job.handle) as buf:
            try:
                buf.wait_for(layout.size, timeout_s=30)
            except ChecksumError as exc:
                errors.append(exc)

    t = threading.Thread(target=wait_for_last)
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert len(errors) == 1 and victim.name in errors[0].message


def test_without_verification_the_corruption_goes_through(make_prefetcher, corrupted, ckpt_index):
    server, victim, layout = corrupted
    pf = make_prefetcher(verify_checksums=False)
    job = pf.prefetch("small", "all", server.url + "/small", ckpt_index.tensors)
    assert job.wait(30).bytes == ckpt_index.total_bytes  # proves the check above is what caught it


def test_truncated_store_file_fails_the_fetch(make_prefetcher, ckpt_root, ckpt_index, tmp_path):
    shutil.copytree(ckpt_root / "small", tmp_path / "small")
    last = sorted(ckpt_index.file_sizes)[-1]
    with open(tmp_path / "small" / last, "r+b") as f:
        f.truncate(ckpt_index.file_sizes[last] - 4096)
    with running(tmp_path) as server:
        pf = make_prefetcher()
        job = pf.prefetch("small", "all", server.url + "/small", ckpt_index.tensors)
        with pytest.raises(FetchFailedError, match="shorter than the index"):
            job.wait(30)
        with open_buffer(job.handle) as buf, \
                pytest.raises(FetchFailedError, match="shorter than the index"):
            list(iter_tensors(buf, plan_stage(ckpt_index.tensors), timeout_s=5))
        assert "small" not in pf.bad_models  # a store error, not a checksum mismatch
