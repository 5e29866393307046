"""Model-store access: byte ranges of stock HF checkpoints over ``file://`` and ``http(s)://``.

``plan_stage`` turns a stage's tensor index into coalesced ranges, ``open_reader`` reads them
(HTTP Range with resume), ``fetch_chunks`` runs several connections at once under a node's
emulated link (``NodeLink``), and ``server`` is a Range-capable store for local clusters.
"""

from gpu_runtime.store.errors import (
    RangeNotSupportedError,
    StoreError,
    StoreFileNotFoundError,
    StoreUnavailableError,
    TruncatedRangeError,
)
from gpu_runtime.store.fetch import Chunk, FetchConfig, fetch_chunks, split_chunks
from gpu_runtime.store.link import MB, FetchStats, LinkConfig, NodeLink, TokenBucket
from gpu_runtime.store.ranges import ByteRange, StageLayout, TensorPlacement, plan_stage
from gpu_runtime.store.readers import RetryPolicy, open_reader

__all__ = [
    "MB", "ByteRange", "Chunk", "FetchConfig", "FetchStats", "LinkConfig", "NodeLink",
    "RangeNotSupportedError", "RetryPolicy", "StageLayout", "StoreError",
    "StoreFileNotFoundError", "StoreUnavailableError", "TensorPlacement", "TokenBucket",
    "TruncatedRangeError", "fetch_chunks", "open_reader", "plan_stage", "split_chunks",
]
