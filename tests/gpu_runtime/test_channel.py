"""The activation channel's wire format and a real round trip over ipc."""

from __future__ import annotations

import struct

import pytest
import torch

from gpu_runtime.channel import HEADER, MAGIC, Channel, ChannelError, Message, decode, encode
from gpu_runtime.pipeline import ipc_addresses


def frames_bytes(frames) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in frames]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_encode_decode_round_trip(dtype):
    t = (torch.randn(3, 5) * 100).to(dtype)
    msg = Message("step", {"context_lens": [3, 4]}, {"hidden": t, "empty": torch.zeros(0, 4)})
    frames = frames_bytes(encode(msg))
    assert frames[0][:4] == MAGIC
    assert len(frames[1]) == t.numel() * t.element_size()  # raw bytes, no per-tensor framing
    back = decode(frames)
    assert back.kind == "step" and back.meta == {"context_lens": [3, 4]}
    assert back.tensors["hidden"].dtype == dtype and torch.equal(back.tensors["hidden"], t)
    assert back.tensors["empty"].shape == (0, 4)


def test_decode_rejects_foreign_or_broken_messages():
    with pytest.raises(ChannelError, match="expected"):
        decode([HEADER.pack(b"NOPE", 1, 2) + b"{}"])
    body = b'{"kind": "step", "meta": {}, "tensors": [{"name": "x", "dtype": "float32", "shape": [1]}]}'
    with pytest.raises(ChannelError, match="1 tensor descriptors but 0 data frames"):
        decode([struct.pack("<4sHI", MAGIC, 1, len(body)) + body])


def test_ring_over_ipc():
    a_addr, b_addr = ipc_addresses(2)
    a, b = Channel(a_addr, b_addr), Channel(b_addr, a_addr)
    try:
        hidden = torch.randn(8, 64, dtype=torch.bfloat16)
        a.send(Message("step", {"n": 1}, {"hidden": hidden}))
        got = b.recv(5000)
        assert got is not None and torch.equal(got.tensors["hidden"], hidden)
        b.send(Message("tokens", {"token_ids": [1, 2]}))
        assert a.recv(5000).meta == {"token_ids": [1, 2]}
        assert a.recv(50) is None  # timeout, nothing pending
    finally:
        a.close()
        b.close()
