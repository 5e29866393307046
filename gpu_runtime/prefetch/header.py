"""The header page in front of every buffer of the shared-memory pool.

Layout (little-endian, 4096 bytes; data starts at ``DATA_OFFSET`` so it is page-aligned)::

    0   u64  magic "HYDRASHM"
    8   u32  version
    12  u32  state        FREE / FETCHING / COMPLETE / FAILED
    16  u32  seq          seqlock counter: odd while the writer updates state/mark/generation
    20  u32  wake         futex word, +1 after every publish
    24  u64  mark         progress mark: data bytes [0, mark) are received AND verified
    32  u64  size         data bytes of the buffer
    40  u64  generation   bumped each time the extent is given to a new buffer
    48  u32  error_code   see errors.ERROR_CODES
    52  u32  key_len      then the key (utf-8) at 64, the error message at 320

One writer (the prefetcher) publishes under a seqlock, then bumps ``wake`` and futex-wakes it;
readers in any process take a consistent snapshot by retrying while ``seq`` is odd or changed,
so an 8-byte mark can never be read torn.
"""

from __future__ import annotations

import mmap
import threading
import time
from dataclasses import dataclass

import numpy as np

from gpu_runtime.prefetch import futex

TORN_AFTER_S = 1.0


class TornHeaderError(RuntimeError):
    """A header whose seqlock never settles: not a live buffer's (the reader's handle is
    stale), or a writer that died mid-update."""


MAGIC = int.from_bytes(b"HYDRASHM", "little")
VERSION = 1
DATA_OFFSET = 4096
FREE, FETCHING, COMPLETE, FAILED = 0, 1, 2, 3
STATE_NAMES = {FREE: "free", FETCHING: "fetching", COMPLETE: "complete", FAILED: "failed"}
KEY_AT, KEY_MAX, MSG_AT, MSG_MAX = 64, 256, 320, 2048


@dataclass(frozen=True, slots=True)
class Snapshot:
    state: int
    mark: int
    size: int
    generation: int
    error_code: int


class Header:
    """A view of one buffer's header inside a mapping (writable for the prefetcher only)."""

    def __init__(self, mm: mmap.mmap, base: int = 0) -> None:
        self._mm, self._base = mm, base
        self._u32 = np.frombuffer(mm, dtype="<u4", count=16, offset=base)
        self._u64 = np.frombuffer(mm, dtype="<u8", count=8, offset=base)
        self.wake_addr = self._u32.__array_interface__["data"][0] + 20
        self._write_lock = threading.Lock()

    # ---- reader side -------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """A consistent (state, mark, size, generation, error_code), whatever the writer does.
        Raises ``TornHeaderError`` when the seqlock stays odd for ``TORN_AFTER_S`` (a writer
        holds it for microseconds: those bytes are no live header)."""
        u32, u64 = self._u32, self._u64
        deadline = None
        while True:
            seq = int(u32[4])
            if seq & 1:
                now = time.monotonic()
                deadline = deadline or now + TORN_AFTER_S
                if now > deadline:
                    raise TornHeaderError(f"header seqlock odd ({seq}) for {TORN_AFTER_S} s")
                time.sleep(0)  # writer mid-update (microseconds); let it finish
                continue
            snap = Snapshot(int(u32[3]), int(u64[3]), int(u64[4]), int(u64[5]), int(u32[12]))
            if int(u32[4]) == seq:
                return snap

    def wake_word(self) -> int:
        return int(self._u32[5])

    def wait_change(self, seen_wake: int, timeout_s: float) -> None:
        """Blocks until the writer publishes after ``seen_wake`` was read, or the timeout."""
        futex.wait(self.wake_addr, seen_wake, timeout_s)

    def magic_ok(self) -> bool:
        return int(self._u64[0]) == MAGIC and int(self._u32[2]) == VERSION

    def key(self) -> str:
        n = int(self._u32[13])
        return bytes(self._mm[self._base + KEY_AT:self._base + KEY_AT + n]).decode()

    def error_message(self) -> str:
        raw = bytes(self._mm[self._base + MSG_AT:self._base + MSG_AT + MSG_MAX])
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    # ---- writer side (prefetcher process) ----------------------------------------------
    def init(self, key: str, size: int, generation: int) -> None:
        """Claims the header for a new buffer: FETCHING, mark 0."""
        raw = key.encode()[:KEY_MAX]
        # the extent may start where another buffer's data lay: its bytes are garbage here,
        # and an odd seq left in them would keep every reader retrying forever
        self._u32[4] = 0
        self._mm[self._base + KEY_AT:self._base + KEY_AT + len(raw)] = raw
        self._mm[self._base + MSG_AT:self._base + MSG_AT + 1] = b"\0"
        self._u64[0], self._u32[2], self._u32[13] = MAGIC, VERSION, len(raw)
        self._publish(state=FETCHING, mark=0, size=size, generation=generation, error_code=0)

    def set_mark(self, mark: int) -> None:
        self._publish(mark=mark)

    def set_state(self, state: int, error_code: int = 0, message: str = "") -> None:
        if message:
            raw = message.encode()[:MSG_MAX - 1] + b"\0"
            self._mm[self._base + MSG_AT:self._base + MSG_AT + len(raw)] = raw
        self._publish(state=state, error_code=error_code)

    def _publish(self, state: int | None = None, mark: int | None = None,
                 size: int | None = None, generation: int | None = None,
                 error_code: int | None = None) -> None:
        u32, u64 = self._u32, self._u64
        with self._write_lock:
            u32[4] += 1  # odd: update in progress
            if state is not None:
                u32[3] = state
            if error_code is not None:
                u32[12] = error_code
            if mark is not None:
                u64[3] = mark
            if size is not None:
                u64[4] = size
            if generation is not None:
                u64[5] = generation
            u32[4] += 1  # even: consistent again
            u32[5] += 1
        futex.wake(self.wake_addr)

    def release_views(self) -> None:
        """Drops the numpy views so the underlying mmap can be closed."""
        del self._u32, self._u64


def address_of(mm: mmap.mmap) -> int:
    """Start address of a mapping (for pointer checks in tests and diagnostics)."""
    return np.frombuffer(mm, dtype=np.uint8, count=1).__array_interface__["data"][0]


