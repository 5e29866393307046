"""Paged attention paths (fresh prefill, decode, chunk over a cached prefix) against one plain
causal attention over the whole sequence, in float32 and bfloat16 (whose cached attention runs
in float32 on CPU), with and without the stage's reusable scratch buffers, and with sliding
windows that start mid-block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu_runtime.attention import AttentionMetadata, Scratch, paged_attention
from gpu_runtime.block_manager import BlockManager

HEADS, KV_HEADS, HD, BS = 4, 2, 8, 4


def reference(q, k, v, window=None):
    """q: (n, heads, hd), k/v: (n, kv_heads, hd) -> (n, heads * hd), causal; with a window,
    query i sees keys i - window + 1 .. i, a mask written independently of the runtime's."""
    q, k, v = (t.double() for t in (q, k, v))
    n = q.shape[0]
    mask = torch.tensor([[j <= i and (window is None or i - j < window) for j in range(n)]
                         for i in range(n)])
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(n, -1)


def run(bm, caches, seqs, pieces, scratch=None, window=None):
    """One step: for each sequence, tokens [start, end) of its q/k/v."""
    q, k, v, slots, ctx, qlen, positions = [], [], [], [], [], [], []
    for sid, (start, end) in zip(seqs, pieces, strict=True):
        tq, tk, tv = caches["qkv"][sid]
        q.append(tq[start:end]), k.append(tk[start:end]), v.append(tv[start:end])
        slots += bm.slots(sid, start, end)
        positions += range(start, end)
        ctx.append(end), qlen.append(end - start)
    width = max(len(bm.block_table(s)) for s in seqs)
    tables = torch.tensor([bm.block_table(s) + [0] * (width - len(bm.block_table(s)))
                           for s in seqs])
    meta = AttentionMetadata(torch.tensor(positions), torch.tensor(slots), tables, ctx, qlen, BS,
                             scratch)
    out = paged_attention(torch.cat(q), torch.cat(k), torch.cat(v), caches["kv"], meta, window)
    return meta, out


# bfloat16 outputs are rounded to 8 mantissa bits (relative 4e-3) of values of size ~1
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


# windows: none; 3 (under every context: it hides keys in each step, sequence 3's prefill
# included, and starts mid-block); 6 (hides keys of the longer sequences only, and in the
# chunk but not in the prefill of length 5); 100 (hides nothing: the plain paths run)
@pytest.mark.parametrize("window", [None, 3, 6, 100])
@pytest.mark.parametrize("lengths", [[7], [5, 11, 3]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_scratch", [False, True])
def test_prefill_chunk_and_decode_paths_match_plain_attention(lengths, dtype, use_scratch,
                                                              window):
    torch.manual_seed(0)
    bm = BlockManager(32, BS)
    caches = {"kv": torch.zeros(2, 32, BS, KV_HEADS, HD, dtype=dtype), "qkv": {}}
    scratch = Scratch() if use_scratch else None
    seqs = list(range(len(lengths)))
    for sid, n in zip(seqs, lengths, strict=True):
        total = n + 6  # prefix, a 4-token chunk, then 2 decode steps
        caches["qkv"][sid] = tuple(torch.randn(total, h, HD).to(dtype)
                                   for h in (HEADS, KV_HEADS, KV_HEADS))
        bm.allocate(sid, total)
    expected = {sid: reference(*caches["qkv"][sid], window) for sid in seqs}
    steps = [[(0, n) for n in lengths], [(n, n + 4) for n in lengths],
             [(n + 4, n + 5) for n in lengths], [(n + 5, n + 6) for n in lengths]]
    kinds = []
    for pieces in steps:
        meta, out = run(bm, caches, seqs, pieces, scratch, window)
        assert out.dtype == dtype, out.dtype
        kinds.append("fresh" if meta.is_fresh_prefill else "decode" if meta.is_decode else
                     "chunk")
        rows = 0
        for sid, (start, end) in zip(seqs, pieces, strict=True):
            torch.testing.assert_close(out[rows:rows + end - start].double(),
                                       expected[sid][start:end], atol=TOLERANCE[dtype],
                                       rtol=TOLERANCE[dtype])
            rows += end - start
    assert kinds == ["fresh", "chunk", "decode", "decode"], kinds


@pytest.mark.parametrize("scrambled", [False, True])
def test_lone_sequence_reads_consecutive_blocks_as_a_view(scrambled):
    torch.manual_seed(1)
    bm = BlockManager(8, BS)
    if scrambled:  # block 1 stays taken, so the sequence gets blocks 0, 2, 3
        bm.allocate(98, 1)
        bm.allocate(99, 1)
        bm.free(98)
    caches = {"kv": torch.zeros(2, 8, BS, KV_HEADS, HD),
              "qkv": {0: (torch.randn(10, HEADS, HD), torch.randn(10, KV_HEADS, HD),
                          torch.randn(10, KV_HEADS, HD))}}
    bm.allocate(0, 10)
    run(bm, caches, [0], [(0, 9)])
    meta, out = run(bm, caches, [0], [(9, 10)])
    assert (meta.first_block is None) == scrambled, (bm.block_table(0), meta.first_block)
    torch.testing.assert_close(out.double(), reference(*caches["qkv"][0])[9:10], atol=1e-5,
                               rtol=1e-5)


def test_scratch_reuses_one_buffer_per_name():
    like = torch.zeros(1, dtype=torch.bfloat16)
    scratch = Scratch()
    first = scratch.get("keys", (4, 8), like)
    smaller = scratch.get("keys", (2, 8), like)
    assert (first.data_ptr(), smaller.shape) == (smaller.data_ptr(), (2, 8)), (first, smaller)
    assert scratch.get("values", (4, 8), like).data_ptr() != first.data_ptr()
    wider = scratch.get("keys", (8, 8), like, torch.float32)
    assert (wider.dtype, wider.shape, wider.is_contiguous()) == (torch.float32, (8, 8), True)
