"""Device-specific kernels behind one interface (``Backend``): the layers, the attention and the
sampler ask ``for_device`` for the backend of their tensors' device and call its ops, whatever
the device.

- ``TorchBackend``: every op in torch; the reference, and the backend of CUDA and any device
  without one of its own (``torch_backend``).
- ``CpuBackend``: the native C kernels where each applies, else the torch op (``cpu``).
- ``CudaBackend``: the torch ops, with decode attention read in place from the paged cache by
  a Triton kernel where Triton is installed (``cuda``, ``triton_decode``).

A CPU gets the ``CpuBackend`` when the native library loads (``gpu_runtime.native``), else
(``HYDRA_NATIVE=0``, no compiler, a failed build) the ``TorchBackend``. Built once per device
type; ``reset`` forgets the choice (tests that switch ``HYDRA_NATIVE``).
"""

from __future__ import annotations

import torch

from gpu_runtime import native
from gpu_runtime.backends.base import Backend
from gpu_runtime.backends.cpu import CpuBackend
from gpu_runtime.backends.torch_backend import TorchBackend

__all__ = ["Backend", "CpuBackend", "TorchBackend", "for_device", "reset"]

_BY_TYPE: dict[str, Backend] = {}
# the same, by device: every layer asks, and a device hashes in a third of the time its
# ``.type`` takes to read (~100 vs ~300 ns)
_BY_DEVICE: dict[torch.device, Backend] = {}


def for_device(device: torch.device) -> Backend:
    """The backend of ``device`` (one per device type: every CUDA device shares one)."""
    backend = _BY_DEVICE.get(device)
    if backend is None:
        backend = _BY_TYPE.get(device.type) or _BY_TYPE.setdefault(device.type,
                                                                   _build(device.type))
        _BY_DEVICE[device] = backend
    return backend


def _build(device_type: str) -> Backend:
    if device_type == "cpu":
        lib = native.load()
        if lib is not None:
            return CpuBackend(lib)
    if device_type == "cuda":
        from gpu_runtime.backends.cuda import CudaBackend  # triton is imported only here

        return CudaBackend()
    return TorchBackend(device_type)


def reset() -> None:
    """Forget the backends built and whether the native library loaded: the next
    ``for_device`` reads ``HYDRA_NATIVE`` and loads again."""
    _BY_DEVICE.clear()
    _BY_TYPE.clear()
    native.load.cache_clear()
