"""Typed errors of the cold-start path (streaming loader, worker pool).

Each carries a class-level HTTP ``status`` the platform maps it to, a ``message`` that says what
failed with which value and how to fix it, and the ``param`` it concerns.
"""

from __future__ import annotations

from gpu_runtime.errors import DataPlaneError


class ColdStartError(DataPlaneError):
    """Base class of cold-start failures."""

    status = 500


class StageLoadError(ColdStartError):
    """A stage could not be materialised from its buffer (missing tensors, bad plan)."""

    status = 502


class WorkerStartError(ColdStartError):
    """A worker process did not come up (import or device initialisation failed)."""

    status = 503


class WorkerDiedError(ColdStartError):
    """A worker process exited while it held or was taking a stage."""

    status = 503


class WorkerFailedError(ColdStartError):
    """A worker reported an exception; ``remote_type`` names the worker-side error class."""

    status = 502

    def __init__(self, message: str, remote_type: str = "", param: str | None = None) -> None:
        super().__init__(message, param)
        self.remote_type = remote_type


class WorkerTimeoutError(ColdStartError):
    """A worker did not answer within the given time."""

    status = 504


class PoolClosedError(ColdStartError):
    """The pool was closed; no new stage can be assigned."""

    status = 503


class AssignmentError(ColdStartError):
    """A stage assignment is inconsistent (addresses, pp, stage index, dtype)."""

    status = 400
