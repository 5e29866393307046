"""A free local TCP port, for stage channels started by hand and for the servers tests and
benchmarks start on this machine."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick; another process may take it before the
    caller binds it, which on a test machine does not happen in practice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
