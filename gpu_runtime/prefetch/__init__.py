"""Node-side prefetcher and shared-memory weight cache (see docs/loading.md).

Node agent: ``Prefetcher(PrefetchConfig(...)).prefetch(model, stage, uri, entries)`` returns a
``FetchJob`` with a serialisable ``BufferHandle``. Worker (any process on the node):
``open_buffer(handle)`` then ``iter_tensors(buffer, plan_stage(entries))`` yields zero-copy
tensors as their bytes arrive and pass their checksum.
"""

from gpu_runtime.prefetch.errors import (
    BufferGoneError,
    BufferInUseError,
    CacheFullError,
    ChecksumError,
    FetchFailedError,
    LayoutMismatchError,
    PoolInUseError,
    PrefetchError,
    WaitTimeoutError,
)
from gpu_runtime.prefetch.handle import TORCH_DTYPES, BufferHandle
from gpu_runtime.prefetch.prefetcher import FetchJob, PrefetchConfig, Prefetcher
from gpu_runtime.prefetch.reader import SharedBuffer, iter_tensors, open_buffer

__all__ = [
    "TORCH_DTYPES", "BufferGoneError", "BufferHandle", "BufferInUseError", "CacheFullError",
    "ChecksumError", "FetchFailedError", "FetchJob", "LayoutMismatchError", "PrefetchConfig",
    "PoolInUseError", "PrefetchError", "Prefetcher", "SharedBuffer", "WaitTimeoutError", "iter_tensors",
    "open_buffer",
]
