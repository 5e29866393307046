"""Host-to-device copies of a stage's tensors from the node cache, on several CUDA streams.

Two paths; which one a load took is the copier's ``path``, reported in the load's stats:

- ``"registered"`` (the default): the stage's whole mapping of the node cache is page-locked
  with the driver for the length of the load (``cudaHostRegister``, as ServerlessLLM pins its
  pool), so every tensor is copied by DMA straight from the cache, in pieces spread round-robin
  over ``num_streams`` streams. The mapping is unregistered when the load ends.
- ``"staged: <why>"``: when registration fails, or ``HYDRA_H2D=staged`` (``CopyConfig.h2d``)
  asks for it, each piece goes through a page-locked staging slot of its stream: the CPU copies
  it pageable -> slot, the stream copies slot -> device, and the CPU fills the next slot
  meanwhile. The slots are allocated when the worker boots (``prepare_staging``), not during a
  cold start, and reused by every load.

Either way each weight is written to device memory once. Only used on CUDA; on CPU the stage's
parameters alias the cache. The driver calls go through ``Driver`` so the choice between the
paths is tested without a GPU.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

H2D_MODES = ("auto", "staged")  # auto: register, stage only when that fails
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context
# cudaHostRegisterReadOnly: the device only reads the range. The node cache is mapped
# PROT_READ, which a plain registration refuses on devices that cannot use the host's page
# tables; tried first, then plain registration
HOST_REGISTER_READ_ONLY = 8
REGISTER_FLAGS = (HOST_REGISTER_PORTABLE | HOST_REGISTER_READ_ONLY, HOST_REGISTER_PORTABLE)
PROBE_BYTES = 16 * mmap.PAGESIZE


@dataclass(frozen=True, slots=True)
class CopyConfig:
    """Streams, piece size and path of the host-to-device copies."""

    num_streams: int = 4
    staging_bytes: int = 64 * 1024 * 1024  # per stream; also the piece size when registered
    h2d: str | None = None  # "auto" or "staged"; None: $HYDRA_H2D, else "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.num_streams <= 32:
            raise ValueError(f"num_streams must be in 1..32, got {self.num_streams}")
        if self.staging_bytes < 1024 * 1024:
            raise ValueError(f"staging_bytes must be >= 1 MiB, got {self.staging_bytes}")
        if self.h2d is not None and self.h2d not in H2D_MODES:
            raise ValueError(f"h2d={self.h2d!r}; allowed {H2D_MODES} or None ($HYDRA_H2D)")

    def mode(self) -> tuple[str, str]:
        """(mode, who chose it): ``h2d``, else ``$HYDRA_H2D``, else auto."""
        if self.h2d is not None:
            return self.h2d, f"CopyConfig.h2d={self.h2d}"
        env = os.environ.get("HYDRA_H2D", "").strip()
        if env and env not in H2D_MODES:
            raise ValueError(f"HYDRA_H2D={env!r}; allowed {H2D_MODES} (auto: register the "
                             "node cache with the driver, staged: copy through pinned slots)")
        return env or "auto", f"HYDRA_H2D={env}" if env else "default"


@dataclass(frozen=True, slots=True)
class HostSpan:
    """A page-aligned range of this process's memory: a stage's mapping of the node cache."""

    ptr: int
    nbytes: int


def span_of(address: int, size: int) -> HostSpan:
    """The whole pages holding ``size`` bytes at ``address`` (a mapping's pages: the rounding
    never leaves the mapping, which is page-aligned at both ends)."""
    page = mmap.PAGESIZE
    start = address - address % page
    end = -(-(address + size) // page) * page
    return HostSpan(start, end - start)


@dataclass(frozen=True, slots=True)
class Driver:
    """The CUDA runtime calls of the registered path; tests pass fakes (no GPU there)."""

    register: Callable[[int, int, int], int]  # cudaHostRegister(ptr, nbytes, flags) -> error
    unregister: Callable[[int], int]  # cudaHostUnregister(ptr) -> error
    describe: Callable[[int], str]  # error code -> the runtime's message
    clear: Callable[[], None]  # takes back the thread's last error after a failed call


def cuda_driver(device: torch.device) -> Driver:
    """torch's bindings of the CUDA runtime, for ``device``."""
    rt = torch.cuda.cudart()

    def clear() -> None:
        # the failed call's error stays as this thread's last CUDA error, and torch's check
        # after the next kernel launch would report it as that kernel's: one tiny kernel
        # reads (and resets) it; a second failure is a real error and is raised
        try:
            torch.zeros(1, device=device).add_(1)
        except RuntimeError:
            torch.zeros(1, device=device).add_(1)

    def describe(code: int) -> str:
        try:
            return str(rt.cudaGetErrorString(rt.cudaError(code)))
        except (TypeError, ValueError):  # a code torch's enum does not list
            return f"cudaError {code}"

    return Driver(register=lambda p, n, f: int(rt.cudaHostRegister(p, n, f)),
                  unregister=lambda p: int(rt.cudaHostUnregister(p)), describe=describe,
                  clear=clear)


def try_register(span: HostSpan, driver: Driver) -> tuple[int | None, str]:
    """Page-locks ``span``, read-only first; (flags used, "") or (None, why each try failed)."""
    failures = []
    for flags in REGISTER_FLAGS:
        code = driver.register(span.ptr, span.nbytes, flags)
        if code == 0:
            return flags, ""
        driver.clear()
        failures.append(f"cudaHostRegister(flags={flags}) failed: {driver.describe(code)} "
                        f"(error {code})")
    return None, "; ".join(failures)


def choose_path(config: CopyConfig, span: HostSpan | None,
                driver: Driver) -> tuple[int | None, str]:
    """(registration flags or None, the path's description). Registers ``span`` when the
    registered path is taken: the caller owns unregistering it."""
    mode, chosen_by = config.mode()
    if mode == "staged":
        return None, f"staged: asked for by {chosen_by}"
    if span is None or span.nbytes == 0:
        return None, "staged: no host mapping to register"
    flags, why = try_register(span, driver)
    return (flags, "registered") if flags is not None else (None, f"staged: {why}")


# ---- staging slots, allocated at worker boot --------------------------------------------------

_SLOTS: dict[tuple[str, int, int], list[torch.Tensor]] = {}


def _slot_key(device: torch.device, config: CopyConfig) -> tuple[str, int, int]:
    # bare "cuda" is device 0 in a worker (which never changes its current device)
    return f"{device.type}:{device.index or 0}", config.num_streams, config.staging_bytes


def _pinned(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def staging_slots(device: torch.device, config: CopyConfig) -> list[torch.Tensor] | None:
    """The slots ``prepare_staging`` made for ``device`` and ``config`` (None: none yet)."""
    return _SLOTS.get(_slot_key(device, config))


def allocate_slots(device: torch.device, config: CopyConfig,
                   allocate: Callable[[int], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """This process's staging slots for ``device`` and ``config``, made on the first call
    (by ``allocate``: page-locked ``torch.empty`` unless a test says otherwise)."""
    key = _slot_key(device, config)
    if key not in _SLOTS:
        make = allocate or _pinned
        _SLOTS[key] = [make(config.staging_bytes) for _ in range(config.num_streams)]
    return _SLOTS[key]


def probe_registration(driver: Driver) -> str:
    """Whether a read-only shared mapping, like the worker's view of the node cache, can be
    registered here: "" when it can, else why not."""
    mm = mmap.mmap(-1, PROBE_BYTES, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    view = np.frombuffer(mm, dtype=np.uint8)  # (PROBE_BYTES,), for its address
    try:
        span = HostSpan(view.ctypes.data, PROBE_BYTES)
        flags, why = try_register(span, driver)
        if flags is not None:
            driver.unregister(span.ptr)
        return why
    finally:
        del view
        mm.close()


def prepare_staging(device: torch.device, config: CopyConfig = CopyConfig(),
                    driver: Driver | None = None,
                    allocate: Callable[[int], torch.Tensor] | None = None) -> str:
    """At worker boot: allocates the pinned staging slots where loads will need them (the
    staged path is asked for, or a probe registration fails), so no cold start pays for
    pinning them. Returns the path loads are expected to take, as the copier names it."""
    mode, chosen_by = config.mode()
    if mode == "staged":
        why = f"asked for by {chosen_by}"
    else:
        why = probe_registration(driver or cuda_driver(device))
        if not why:
            return "registered"
    allocate_slots(device, config, allocate)
    return f"staged: {why}"


# ---- the copiers -----------------------------------------------------------------------------

class StreamCopier:
    """Copies host tensors to ``device`` in pieces, round-robin over ``num_streams`` streams;
    subclasses say how one piece crosses."""

    def __init__(self, device: torch.device, config: CopyConfig, path: str) -> None:
        assert device.type == "cuda", f"{type(self).__name__} needs a cuda device, got {device}"
        self.device, self.config, self.path = device, config, path
        self.streams = [torch.cuda.Stream(device) for _ in range(config.num_streams)]
        self._next = 0
        self.bytes_copied = 0

    def to_device(self, src: torch.Tensor, wait: bool = False) -> torch.Tensor:
        """A device tensor with ``src``'s bytes. The copy may still be in flight until
        ``finish``; with ``wait`` the current stream waits for it (needed before the current
        stream reads the tensor, e.g. to convert its dtype)."""
        dst = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        if src.numel() == 0:
            return dst
        src_bytes = src.contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
        dst_bytes = dst.reshape(-1).view(torch.uint8)  # (nbytes,)
        current = torch.cuda.current_stream(self.device)
        used: set[int] = set()
        n, step = src_bytes.numel(), self.config.staging_bytes
        for start in range(0, n, step):
            k = self._take_stream()
            stream = self.streams[k]
            # dst was allocated on the current stream, which may still convert the tensor
            # before it in memory the allocator just handed out again
            stream.wait_stream(current)
            self._copy_piece(k, dst_bytes[start:start + step], src_bytes[start:start + step])
            used.add(k)
        for k in used:  # the allocator must not reuse dst's memory before these copies end
            dst.record_stream(self.streams[k])
            if wait:
                current.wait_stream(self.streams[k])
        self.bytes_copied += n
        return dst

    def _take_stream(self) -> int:
        k = self._next
        self._next = (k + 1) % len(self.streams)
        return k

    def _copy_piece(self, k: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Makes the current stream wait for every copy; parameters are usable after this."""
        current = torch.cuda.current_stream(self.device)
        for s in self.streams:
            current.wait_stream(s)
        current.synchronize()

    def close(self) -> None:
        """Waits for every copy still in flight; the copier is not used after this."""
        for s in self.streams:
            s.synchronize()


class RegisteredCopier(StreamCopier):
    """DMA straight from the node cache, page-locked as ``span`` for the copier's life."""

    def __init__(self, device: torch.device, config: CopyConfig, span: HostSpan,
                 driver: Driver, path: str = "registered") -> None:
        super().__init__(device, config, path)
        self.span, self.driver = span, driver
        self._registered = True

    def _copy_piece(self, k: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.streams[k]):
            dst.copy_(src, non_blocking=True)

    def close(self) -> None:
        """Waits for the copies, then unregisters the mapping (the weights are on the device;
        the cache's pages need not stay locked)."""
        super().close()
        if self._registered:
            self._registered = False
            code = self.driver.unregister(self.span.ptr)
            if code != 0:
                self.driver.clear()
                self.path += (f"; cudaHostUnregister failed: {self.driver.describe(code)} "
                              f"(error {code})")


class PinnedStreamCopier(StreamCopier):
    """Copies through one pinned staging slot per stream (``prepare_staging``'s, when the
    worker made them at boot)."""

    def __init__(self, device: torch.device, config: CopyConfig = CopyConfig(),
                 slots: list[torch.Tensor] | None = None, path: str = "staged") -> None:
        super().__init__(device, config, path)
        if slots is None:
            slots = staging_slots(device, config)
        if slots is None:
            self.path += "; staging slots allocated during the load, not at worker boot"
            slots = allocate_slots(device, config)
        assert len(slots) == config.num_streams, (len(slots), config.num_streams)
        self.slots = slots
        self.events: list[torch.cuda.Event | None] = [None] * config.num_streams

    def _take_stream(self) -> int:
        """The next slot in round-robin order, once its previous copy has left it."""
        k = super()._take_stream()
        event = self.events[k]
        if event is not None:
            event.synchronize()
        return k

    def _copy_piece(self, k: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        slot = self.slots[k][:src.numel()]
        slot.copy_(src)  # pageable -> pinned, on the CPU
        stream = self.streams[k]
        with torch.cuda.stream(stream):
            dst.copy_(slot, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        self.events[k] = event


def open_copier(device: torch.device, config: CopyConfig, span: HostSpan | None,
                driver: Driver | None = None) -> StreamCopier:
    """The copier of one load from the mapping ``span``: registered when the driver takes
    the mapping, else staged; its ``path`` says which, and why. Close it when the load ends."""
    driver = driver or cuda_driver(device)
    flags, path = choose_path(config, span, driver)
    if flags is not None:
        assert span is not None, "registered without a span"
        return RegisteredCopier(device, config, span, driver, path)
    return PinnedStreamCopier(device, config, path=path)
