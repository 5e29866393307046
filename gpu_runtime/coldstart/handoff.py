"""The hand-off of a loaded stage 0 to its caller's request loop.

The data plane defines the interface; the caller (the platform) implements it. A ``StageServer``
is a small picklable value (a frozen dataclass of ids, say) that travels inside the stage plan to
a spawned pool worker, so the data plane never imports the caller, and no names of modules or
functions travel as strings. ``check_server`` runs when the plan is made: a wrong wiring fails
there, on the node, with a message, not as a late error inside the worker.
"""

from __future__ import annotations

import inspect
import pickle
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from gpu_runtime.coldstart.errors import AssignmentError

if TYPE_CHECKING:
    from gpu_runtime.engine import LLMEngine


@runtime_checkable
class StageServer(Protocol):
    """Takes over stage 0 once its engine is up, instead of the pool's request pipe."""

    def prepare(self) -> Any:
        """Runs in a thread of the worker while the stage loads (connections, lookups), so its
        cost is off the cold start's critical path; its result is handed to ``serve``."""

    def serve(self, engine: LLMEngine, report: dict[str, Any], prepared: Any,
              control: ControlInbox | None = None) -> None:
        """Serves with ``engine`` until done; ``report`` is the stage's load report (init,
        load and ready times); ``control`` brings the node's messages (the rest of the model
        to consolidate into). Returning ends the worker."""


class ControlInbox:
    """What the node sends a serving stage 0 over the pool's pipe, e.g. ``("consolidate",
    {...})``: a thread reads the pipe, the serving loop polls between steps."""

    def __init__(self, conn: Connection,
                 on_message: Callable[[tuple], None] | None = None) -> None:
        """``on_message``: called on the reading thread for each message instead of queueing
        it (a later stage has no loop between steps to poll from)."""
        self._queue: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._on_message = on_message or self._queue.put
        threading.Thread(target=self._read, args=(conn,), daemon=True, name="control").start()

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the node closed the pipe: nothing more will come
                return
            self._on_message(msg)

    def poll(self) -> list[tuple]:
        """The messages that arrived since the last poll, oldest first."""
        out = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out


def check_server(server: object) -> StageServer:
    """``server`` if it implements ``StageServer`` and can travel to a worker, else an
    ``AssignmentError`` saying what is wrong."""
    if not isinstance(server, StageServer):
        missing = [m for m in ("prepare", "serve") if not callable(getattr(server, m, None))]
        raise AssignmentError(f"stage server {server!r} of type {type(server).__name__} lacks "
                              f"{missing}; it must implement gpu_runtime.coldstart.StageServer "
                              "(prepare() and serve(engine, report, prepared, control))",
                              "server")
    for name, args in (("prepare", ()), ("serve", (None, {}, None, None))):
        try:
            inspect.signature(getattr(server, name)).bind(*args)
        except TypeError as exc:
            raise AssignmentError(f"stage server {type(server).__name__}.{name} cannot be "
                                  f"called as StageServer.{name} calls it: {exc}",
                                  "server") from None
    try:
        pickle.dumps(server)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise AssignmentError(f"stage server {server!r} cannot be sent to a worker process "
                              f"({type(exc).__name__}: {exc}); make it a module-level "
                              "dataclass of plain values", "server") from None
    return server


def check_server_class(cls: type) -> type:
    """``cls`` if it is a class implementing ``StageServer`` (a pool's ``preload``)."""
    if not isinstance(cls, type) or not issubclass(cls, StageServer):
        raise AssignmentError(f"preload entry {cls!r} is not a class implementing "
                              "gpu_runtime.coldstart.StageServer", "preload")
    return cls
