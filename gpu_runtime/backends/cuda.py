"""The CUDA backend: the torch backend's ops, with decode attention read straight from the
paged cache by the Triton kernel (``triton_decode``) where Triton is installed, instead of
SDPA over a contiguous gather of every context.

A CUDA step's indices are checked on the host before they are sent (``model_runner``), so the
backend trusts them and the step has no device-to-host read: ``write_kv`` skips the torch
backend's check, whose read-back would wait for the device once per step. Without Triton (or
with ``HYDRA_TRITON_DECODE=0``) decode attention is the torch backend's: SDPA over the blocks
gathered on the device.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch

from gpu_runtime.backends import triton_decode
from gpu_runtime.backends.torch_backend import TorchBackend
from gpu_runtime.devices import to_device

if TYPE_CHECKING:
    from gpu_runtime.attention import AttentionMetadata


class CudaBackend(TorchBackend):
    def __init__(self, paged_kernel: bool | None = None) -> None:
        super().__init__("cuda")
        if paged_kernel is None:
            paged_kernel = (os.environ.get("HYDRA_TRITON_DECODE", "1") != "0"
                            and triton_decode.available())
        self.paged_kernel = paged_kernel

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
        if meta.checked_cache is None:  # built here without the host check: check on device
            super().write_kv(kv_cache, k, v, meta)
            return
        slots = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
        slots[0].index_copy_(0, meta.slot_mapping, k)
        slots[1].index_copy_(0, meta.slot_mapping, v)

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if not self.paged_kernel:
            return super().decode_attention(q, k, v, kv_cache, meta)
        self.write_kv(kv_cache, k, v, meta)
        if meta.context_lens_tensor is None or meta.context_lens_tensor.device != q.device:
            meta.context_lens_tensor = to_device(torch.tensor(meta.context_lens,
                                                              dtype=torch.int32), q.device)
        return triton_decode.paged_decode_attention(
            q, kv_cache, meta.block_tables, meta.context_lens_tensor, 1.0 / math.sqrt(q.shape[2]))
