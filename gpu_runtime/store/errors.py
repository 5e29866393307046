"""Typed errors of the model-store access layer.

Each carries a class-level HTTP ``status`` (what the platform answers when the error reaches an
API caller), a ``message`` that says what failed, with which value, and how to fix it, and the
``param`` it concerns.
"""

from __future__ import annotations

from gpu_runtime.errors import DataPlaneError


class StoreError(DataPlaneError):
    """A model store could not deliver the bytes that were asked for."""

    status = 502
    default_param = "model"


class StoreUnavailableError(StoreError):
    """The store did not answer (connection refused, reset or timed out) after every retry."""

    status = 503


class StoreFileNotFoundError(StoreError):
    """A checkpoint file named in the tensor index is not in the store."""

    status = 404


class RangeNotSupportedError(StoreError):
    """The store ignored a Range request or answered a range other than the one asked for."""


class TruncatedRangeError(StoreError):
    """The store holds fewer bytes than the tensor index says (file truncated or replaced)."""
