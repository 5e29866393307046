"""Helpers for the store tests (a unique module name: test dirs are not packages)."""

from __future__ import annotations

import threading
from pathlib import Path

from gpu_runtime.store.server import StoreServer


def file_bytes(root: Path, file: str, start: int, end: int) -> bytes:
    with open(root / file, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def start_server(root: Path, handler) -> StoreServer:
    """A store server with a custom (fault-injecting) handler class."""
    server = StoreServer(root, port=0, handler=handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
