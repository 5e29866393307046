"""The device a worker runs on, named the way a plan names it.

A node registers its devices by index; a plan places each stage on one of them. The worker is
told the device as a name:

    cuda:N  the node's CUDA device N (``torch.device("cuda", N)``)
    cpu:N   the node's CPU device N: one of ``count`` equal slices of the cores this process
            may use (a node started with ``--devices cpu:2`` on 8 cores has two 4-core
            devices); the worker pins itself to its slice, so two stages on one node do
            not share cores
    cpu     every core (a single CPU device)

``bind`` applies a name in the worker process and says what it did; the worker's ready report
carries that, so the node (and the admin view) can tell the device a stage really runs on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a device is used: the API names devices only
    import torch

NAME = re.compile(r"(cpu|cuda)(?::(\d+))?")


class DeviceNameError(ValueError):
    """A device name that is not ``cpu``, ``cpu:N``, ``cuda`` or ``cuda:N``."""


@dataclass(frozen=True, slots=True)
class DeviceName:
    kind: str  # cpu | cuda
    index: int | None  # None: cpu (all cores) or cuda (the current device, 0 unless set)

    @classmethod
    def parse(cls, name: str) -> DeviceName:
        m = NAME.fullmatch(name.strip())
        if m is None:
            raise DeviceNameError(f"device {name!r}; allowed 'cpu', 'cpu:N', 'cuda' or 'cuda:N'")
        return cls(m.group(1), None if m.group(2) is None else int(m.group(2)))

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    def torch_device(self) -> torch.device:
        """The tensor device: ``cuda:N`` as is (bare ``cuda`` is device 0 unless the process
        chose another), every CPU device is torch's one ``cpu``."""
        import torch

        if self.kind == "cuda":
            return torch.device("cuda", self.index if self.index is not None else 0)
        return torch.device("cpu")


def node_device_name(kind: str, index: int) -> str:
    """The worker's name for a node's registered device (``Device.kind`` is ``cpu`` or
    ``cuda[:<product name>]``)."""
    return f"{'cuda' if kind.startswith('cuda') else 'cpu'}:{index}"


def cpu_device_count(names: Iterable[str]) -> int:
    """How many CPU devices (slices of the node's cores) these device names hold; at least 1
    (a node with none still runs its CPU work on every core)."""
    return sum(DeviceName.parse(n).kind == "cpu" for n in names) or 1


def cpu_slice(index: int, count: int, cores: list[int] | None = None) -> list[int]:
    """The cores of CPU device ``index`` of ``count``: contiguous, equal slices of ``cores``
    (this process's affinity by default); with fewer cores than devices, devices share a core
    round-robin rather than get none."""
    if not 0 <= index < count:
        raise DeviceNameError(f"cpu device {index} of {count}; allowed 0..{count - 1}")
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(cores) < count:
        return [cores[index % len(cores)]]
    per = len(cores) // count
    return cores[index * per:(index + 1) * per]


def bind(name: str, cpu_devices: int = 1, num_threads: int | None = None,
         memory_bytes: int = 0) -> dict:
    """Runs this process on device ``name``: a CUDA device becomes current, its caching
    allocator capped at ``memory_bytes`` (0: no cap); a CPU device ``cpu:N`` of
    ``cpu_devices`` pins the process to its slice of the cores, with as many torch threads
    (unless ``num_threads`` says otherwise). Returns what it did, for the worker's report."""
    import torch

    d = DeviceName.parse(name)
    report: dict = {"device": str(d)}
    if d.kind == "cuda":
        device = d.torch_device()
        torch.cuda.set_device(device)
        if memory_bytes:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(memory_bytes / total, 1.0), device)
            report["memory_cap_bytes"] = min(memory_bytes, total)
        return report
    if d.index is not None and cpu_devices > 1:
        cores = cpu_slice(d.index, cpu_devices)
        pin(cores)
        if num_threads is None:
            torch.set_num_threads(len(cores))
    report["cores"] = sorted(os.sched_getaffinity(0))
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    report["threads"] = torch.get_num_threads()
    return report


def pin(cores: list[int]) -> None:
    """Pins every thread of this process (torch's OpenMP threads started at boot included:
    affinity is per thread on Linux) and the threads it starts later to ``cores``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # the thread ended since the listing
            continue


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; into CUDA memory staged in page-locked memory and without blocking
    the host (ordered on the current stream, as ``to_device``)."""
    if dst.device.type == "cuda" and src.device.type == "cpu":
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A step input on ``device``: on CUDA staged in page-locked memory and sent without
    blocking the host (the copy is ordered on the current stream before the kernels that read
    it); elsewhere the tensor itself."""
    if device.type != "cuda" or t.device == device:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
