"""The shared header: consistent snapshots under a busy writer, futex wake-ups that work."""

from __future__ import annotations

import mmap
import threading
import time

import pytest

from gpu_runtime.prefetch import futex
from gpu_runtime.prefetch.header import COMPLETE, FETCHING, Header


@pytest.fixture
def header():
    mm = mmap.mmap(-1, 4096)
    h = Header(mm, 0)
    h.init("m/s/x", size=1 << 40, generation=1)
    yield h
    h.release_views()
    mm.close()


def test_snapshot_is_never_torn_while_the_writer_publishes(header):
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            # mark and generation always move together: a torn read would split them
            header._publish(mark=i * 0x1_0000_0001, generation=i)

    t = threading.Thread(target=writer)
    t.start()
    try:
        reads = 0
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            snap = header.snapshot()
            assert snap.mark == snap.generation * 0x1_0000_0001, snap
            reads += 1
    finally:
        stop.set()
        t.join()
    assert reads > 1000 and header.snapshot().generation > 100


def test_init_and_state_round_trip(header):
    snap = header.snapshot()
    assert (snap.state, snap.mark, snap.size, snap.generation) == (FETCHING, 0, 1 << 40, 1)
    assert header.magic_ok() and header.key() == "m/s/x"
    header.set_state(COMPLETE, 2, "crc mismatch in t1")
    assert header.snapshot().state == COMPLETE and header.snapshot().error_code == 2
    assert header.error_message() == "crc mismatch in t1"


@pytest.mark.skipif(not futex.AVAILABLE, reason="futex needs Linux on x86_64 or aarch64")
def test_futex_wait_returns_on_wake_not_on_timeout(header):
    seen = header.wake_word()
    timer = threading.Timer(0.1, lambda: header.set_mark(5))
    timer.start()
    started = time.monotonic()
    header.wait_change(seen, timeout_s=5.0)
    elapsed = time.monotonic() - started
    timer.join()  # the publisher may still hold views of the mapping right after the wake
    assert 0.05 < elapsed < 1.0, elapsed  # woke by the publish, long before the 5 s timeout
    assert header.snapshot().mark == 5


@pytest.mark.skipif(not futex.AVAILABLE, reason="futex needs Linux on x86_64 or aarch64")
def test_futex_wait_returns_at_once_if_something_was_published(header):
    seen = header.wake_word()
    header.set_mark(7)  # published between reading the word and waiting: no lost wake-up
    started = time.monotonic()
    header.wait_change(seen, timeout_s=5.0)
    assert time.monotonic() - started < 0.5


def test_a_header_written_over_old_data_starts_with_an_even_seqlock():
    """A new buffer's extent may start where another buffer's data lay: an odd word at the
    seqlock's place must not survive ``init`` (every reader would retry forever), and a
    reader of bytes that never settle gives up with TornHeaderError instead of spinning."""
    from gpu_runtime.prefetch.header import TORN_AFTER_S, TornHeaderError

    mm = mmap.mmap(-1, 4096)
    mm[:4096] = bytes([0x6F]) * 4096  # data of a buffer that lay here: seq reads odd
    h = Header(mm, 0)
    started = time.monotonic()
    with pytest.raises(TornHeaderError, match="odd"):
        h.snapshot()
    assert time.monotonic() - started >= TORN_AFTER_S
    h.init("m/s/y", size=10, generation=3)
    snap = h.snapshot()  # at once
    assert (snap.state, snap.generation, snap.size) == (FETCHING, 3, 10)
    h.release_views()
    mm.close()
