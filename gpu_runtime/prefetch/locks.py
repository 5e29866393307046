"""Open-file-description (OFD) byte-range locks: the cross-process refcount of a buffer.

A reader holds a shared lock on the first byte of its buffer's extent for as long as it maps
the buffer; the prefetcher may evict an extent only if it can take an exclusive lock on that
byte. The kernel is the refcount: it drops a reader's lock when the reader closes the file or
dies, so a crashed worker can never pin a buffer forever. OFD locks (unlike classic POSIX
``lockf`` locks) belong to one open file, so closing another descriptor of the same file in the
same process does not drop them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

if not hasattr(fcntl, "F_OFD_SETLK"):  # pragma: no cover - Linux >= 3.15 has them
    raise ImportError("the shared-memory cache needs Linux OFD locks (fcntl.F_OFD_SETLK)")

# struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
_FLOCK = "hhqqi4x"


def _flock(kind: int, start: int, length: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, start, length, 0)


def lock_shared(fd: int, start: int, blocking: bool = True) -> bool:
    """Takes a shared lock on byte ``start``; False if not blocking and it is held exclusively."""
    return _set(fd, fcntl.F_RDLCK, start, blocking)


def try_lock_exclusive(fd: int, start: int) -> bool:
    """Takes an exclusive lock on byte ``start`` if nobody holds any lock on it."""
    return _set(fd, fcntl.F_WRLCK, start, blocking=False)


def unlock(fd: int, start: int) -> None:
    _set(fd, fcntl.F_UNLCK, start, blocking=False)


def is_locked(fd: int, start: int) -> bool:
    """Whether another open file holds any lock on byte ``start`` (a reader uses the extent)."""
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, start, 1))
    return struct.unpack(_FLOCK, got)[0] != fcntl.F_UNLCK


def _set(fd: int, kind: int, start: int, blocking: bool) -> bool:
    cmd = fcntl.F_OFD_SETLKW if blocking else fcntl.F_OFD_SETLK
    try:
        fcntl.fcntl(fd, cmd, _flock(kind, start, 1))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def count_holders(fd: int, start: int) -> int:
    """How many open files hold a lock on byte ``start`` of ``fd``'s file, from /proc/locks.

    Diagnostics only (the cache decides with ``try_lock_exclusive``, which is atomic).
    """
    st = os.fstat(fd)
    inode = str(st.st_ino)
    count = 0
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts:  # a waiter, not a holder
                continue
            if len(parts) >= 8 and parts[5].rsplit(":", 1)[-1] == inode and parts[6] == str(start):
                count += 1
    return count
