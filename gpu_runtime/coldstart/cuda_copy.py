"""Host-to-device copies of tensors arriving in the shared-memory cache, on several CUDA streams.

The cache is ordinary pageable memory (a /dev/shm mapping), which the GPU cannot read by DMA. Each
stream owns one page-locked staging slot: a tensor is cut into slot-sized pieces, each piece is
copied host->pinned on the CPU and then pinned->device asynchronously on that slot's stream, so
the CPU fills the next slot while earlier pieces cross the bus. The weight lands in device memory
once; the staging slots are a fixed transit area that is reused, never a second copy of the model.

Only used when ``torch.cuda.is_available()``; the CPU path aliases the cache instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class CopyConfig:
    """Streams and staging of the host-to-device path."""

    num_streams: int = 4
    staging_bytes: int = 64 * 1024 * 1024  # per stream

    def __post_init__(self) -> None:
        if not 1 <= self.num_streams <= 32:
            raise ValueError(f"num_streams must be in 1..32, got {self.num_streams}")
        if self.staging_bytes < 1024 * 1024:
            raise ValueError(f"staging_bytes must be >= 1 MiB, got {self.staging_bytes}")


class PinnedStreamCopier:
    """Copies host tensors to ``device`` through pinned slots on ``num_streams`` streams."""

    def __init__(self, device: torch.device, config: CopyConfig = CopyConfig()) -> None:
        assert device.type == "cuda", f"PinnedStreamCopier needs a cuda device, got {device}"
        self.device, self.config = device, config
        self.streams = [torch.cuda.Stream(device) for _ in range(config.num_streams)]
        self.slots = [torch.empty(config.staging_bytes, dtype=torch.uint8, pin_memory=True)
                      for _ in range(config.num_streams)]
        self.events: list[torch.cuda.Event | None] = [None] * config.num_streams
        self._next = 0
        self.bytes_copied = 0
        producer = torch.cuda.current_stream(device)
        for s in self.streams:  # device allocations made on the current stream come first
            s.wait_stream(producer)

    def to_device(self, src: torch.Tensor, wait: bool = False) -> torch.Tensor:
        """A device tensor with ``src``'s bytes. The copy may still be in flight until
        ``finish``; with ``wait`` the current stream waits for it (needed before the current
        stream reads the tensor, e.g. to convert its dtype)."""
        dst = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        if src.numel() == 0:
            return dst
        used: set[int] = set()
        src_bytes = src.contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
        dst_bytes = dst.reshape(-1).view(torch.uint8)  # (nbytes,)
        n, step = src_bytes.numel(), self.config.staging_bytes
        for start in range(0, n, step):
            size = min(step, n - start)
            k = self._take_slot()
            slot = self.slots[k][:size]
            slot.copy_(src_bytes[start:start + size])  # pageable -> pinned, on the CPU
            stream = self.streams[k]
            with torch.cuda.stream(stream):
                dst_bytes[start:start + size].copy_(slot, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            self.events[k] = event
            used.add(k)
        current = torch.cuda.current_stream(self.device)
        for k in used:  # the allocator must not reuse dst's memory before these copies end
            dst.record_stream(self.streams[k])
            if wait:
                current.wait_stream(self.streams[k])
        self.bytes_copied += n
        return dst

    def _take_slot(self) -> int:
        """The next slot in round-robin order, once its previous copy has left it."""
        k = self._next
        self._next = (k + 1) % len(self.streams)
        event = self.events[k]
        if event is not None:
            event.synchronize()
        return k

    def finish(self) -> None:
        """Makes the current stream wait for every copy; parameters are usable after this."""
        current = torch.cuda.current_stream(self.device)
        for s in self.streams:
            current.wait_stream(s)
        current.synchronize()
