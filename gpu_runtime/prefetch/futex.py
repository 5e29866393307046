"""Linux futex wait/wake on a 32-bit word in a shared file mapping.

Without the ``FUTEX_PRIVATE_FLAG`` the kernel keys the futex on the backing page, so a writer and
readers in different processes (mapping the same /dev/shm file) meet on the same word. Where
futexes are not available (another OS or architecture) ``wait`` degrades to a short sleep and the
caller's loop polls.
"""

from __future__ import annotations

import ctypes
import os
import time

FUTEX_WAIT = 0
FUTEX_WAKE = 1
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)
_INT_MAX = 2**31 - 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load_syscall():  # noqa: ANN202 - a ctypes function pointer
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):  # pragma: no cover - non-Linux
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall = _load_syscall()
AVAILABLE = _SYS_FUTEX is not None and _syscall is not None and os.uname().sysname == "Linux"
_NR = _SYS_FUTEX or 0
POLL_S = 0.0005  # fallback sleep when futexes are not available


def wait(addr: int, expected: int, timeout_s: float) -> None:
    """Sleeps while the u32 at ``addr`` equals ``expected``, at most ``timeout_s``.

    Returns early on a wake, a signal, or when the word already differs; the caller re-checks.
    """
    if not AVAILABLE or _syscall is None:
        time.sleep(min(timeout_s, POLL_S))
        return
    sec = int(timeout_s)
    ts = _Timespec(sec, int((timeout_s - sec) * 1e9))
    _syscall(ctypes.c_long(_NR), ctypes.c_void_p(addr), ctypes.c_long(FUTEX_WAIT),
             ctypes.c_long(expected & 0xFFFFFFFF), ctypes.byref(ts), None, ctypes.c_long(0))


def wake(addr: int, count: int = _INT_MAX) -> int:
    """Wakes up to ``count`` waiters on the u32 at ``addr``; returns how many woke."""
    if not AVAILABLE or _syscall is None:
        return 0
    return int(_syscall(ctypes.c_long(_NR), ctypes.c_void_p(addr),
                        ctypes.c_long(FUTEX_WAKE), ctypes.c_long(count), None, None,
                        ctypes.c_long(0)))
