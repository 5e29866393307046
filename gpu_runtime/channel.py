"""Activation channel between pipeline stages: a small binary protocol over pyzmq.

A message is a zmq multipart: frame 0 is the header (magic, version, JSON length, then JSON
with the message kind, small metadata and one descriptor per tensor: name, dtype, shape); each
further frame is one tensor's raw bytes, sent without a copy. Stage i pushes to stage i + 1 and
the last stage pushes sampled tokens back to stage 0, so the stages form a ring. ``ipc://``
addresses serve one machine, ``tcp://host:port`` addresses span hosts.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch
import zmq

MAGIC = b"HSAC"
VERSION = 1
HEADER = struct.Struct("<4sHI")  # magic, protocol version, JSON length
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8)}


class ChannelError(RuntimeError):
    """A malformed message, a protocol mismatch, or a peer that stopped answering."""


@dataclass(slots=True)
class Message:
    kind: str
    meta: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy; from CUDA through a pinned buffer (a DMA copy, not a staged one)."""
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return host
    return t.contiguous()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Received bytes onto the stage's device (pinned first on CUDA so the copy is async)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def encode(msg: Message) -> list:
    """Message -> zmq frames (header, then raw bytes per tensor)."""
    descs, frames = [], []
    for name, t in msg.tensors.items():
        t = to_host(t.detach())
        descs.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."),
                      "shape": list(t.shape)})
        frames.append(t.view(torch.uint8).numpy() if t.numel() else b"")  # raw bytes, no copy
    body = json.dumps({"kind": msg.kind, "meta": msg.meta, "tensors": descs}).encode()
    return [HEADER.pack(MAGIC, VERSION, len(body)) + body, *frames]


def decode(frames: list) -> Message:
    """zmq frames -> Message; tensors own their memory (one copy out of the zmq buffer)."""
    head = bytes(frames[0])
    if len(head) < HEADER.size:
        raise ChannelError(f"header of {len(head)} bytes, need at least {HEADER.size}")
    magic, version, length = HEADER.unpack_from(head)
    if magic != MAGIC or version != VERSION:
        raise ChannelError(f"peer speaks {magic!r} v{version}; expected {MAGIC!r} v{VERSION}")
    body = json.loads(head[HEADER.size:HEADER.size + length])
    descs = body["tensors"]
    if len(descs) != len(frames) - 1:
        raise ChannelError(f"{len(descs)} tensor descriptors but {len(frames) - 1} data frames")
    tensors = {}
    for desc, frame in zip(descs, frames[1:], strict=True):
        dtype = DTYPES[desc["dtype"]]
        raw = bytearray(frame.buffer if hasattr(frame, "buffer") else frame)
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[desc["name"]] = flat.view(desc["shape"])
    return Message(body["kind"], body["meta"], tensors)


class Channel:
    """One stage's ends of the ring: receives on ``listen``, sends to ``send_to``."""

    def __init__(self, listen: str, send_to: str) -> None:
        self.ctx: zmq.Context = zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(listen)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 1000)
        self.push.connect(send_to)
        self.bytes_sent = 0

    def send(self, msg: Message) -> None:
        frames = encode(msg)
        self.bytes_sent += sum(len(memoryview(f).cast("B")) for f in frames)
        self.push.send_multipart(frames, copy=False)

    def recv(self, timeout_ms: int | None = None) -> Message | None:
        """Next message, or None when ``timeout_ms`` passes first."""
        if timeout_ms is not None and not self.pull.poll(timeout_ms):
            return None
        return decode(self.pull.recv_multipart(copy=False))

    def close(self) -> None:
        self.pull.close(linger=0)
        self.push.close()
