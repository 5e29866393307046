"""Typed errors of the node-side prefetcher and its shared-memory cache."""

from __future__ import annotations

from gpu_runtime.errors import DataPlaneError


class PrefetchError(DataPlaneError):
    """Base class; ``status`` is the HTTP status the platform maps it to."""

    status = 500


class ChecksumError(PrefetchError):
    """Downloaded bytes of a tensor do not match the crc32 recorded at registration."""

    status = 502

    def __init__(self, message: str, tensor: str = "", expected: int = 0, actual: int = 0) -> None:
        super().__init__(message, "model")
        self.tensor, self.expected, self.actual = tensor, expected, actual


class FetchFailedError(PrefetchError):
    """The fetch of a buffer failed (store error, truncated file); nothing more is served."""

    status = 502


class CacheFullError(PrefetchError):
    """The pool cannot hold a buffer even after evicting every idle entry."""

    status = 507


class PoolInUseError(PrefetchError):
    """Another live node agent owns the pool file this prefetcher would use."""

    status = 409


class BufferGoneError(PrefetchError):
    """A handle names a buffer that was evicted or replaced since the handle was made."""

    status = 410


class BufferInUseError(PrefetchError):
    """A buffer cannot be closed while tensors still alias its memory."""

    status = 409


class LayoutMismatchError(PrefetchError):
    """A reader's stage layout differs from the one the buffer was filled with."""

    status = 409


class WaitTimeoutError(PrefetchError):
    """The progress mark did not reach the wanted offset in time."""

    status = 504


# codes stored in the shared header so a reader in another process raises the right type
ERROR_CODES: dict[int, type[PrefetchError]] = {1: FetchFailedError, 2: ChecksumError}
CODE_OF = {cls: code for code, cls in ERROR_CODES.items()}
