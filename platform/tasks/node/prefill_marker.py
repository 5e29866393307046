"""Which requests a stage-0 worker is prefilling, in a file its node agent reads after the
worker dies: the suspects of that death (invocations/quarantine.py).

The worker rewrites the file only when the set changes (a step that admits new requests, and
the step after their first tokens), about 20 us each time; the agent reads and removes it when
it reaps the worker. The file is named after the cluster's queue prefix and the instance id,
so clusters that share a machine (tests, two checkouts) never read each other's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def marker_path(queue_prefix: str, instance_id: int) -> Path:
    root = os.environ.get("HYDRA_LOG_DIR") or tempfile.gettempdir()
    return Path(root) / f"{queue_prefix}prefilling-{instance_id}"


class PrefillMarker:
    """The worker's side: ``mark(ids)`` before a step, ``clear()`` when the loop stops for a
    reason that is not a request's (a lost broker or database connection)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._written: tuple[str, ...] = ()
        self.path.unlink(missing_ok=True)  # an earlier worker of the same id left it

    def mark(self, inv_ids: tuple[str, ...]) -> None:
        if inv_ids == self._written:
            return
        if inv_ids:
            self.path.write_text("\n".join(inv_ids))
        else:
            self.path.unlink(missing_ok=True)
        self._written = inv_ids

    def clear(self) -> None:
        self.mark(())


def take(path: Path) -> list[str]:
    """The agent's side: the ids in the file (none if there is no file), and the file removed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    path.unlink(missing_ok=True)
    return [line for line in text.splitlines() if line.startswith("inv_")]
