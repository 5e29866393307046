"""Native CPU kernels (the ``native_*`` calls of ``gpu_runtime.backends.cpu``) against the torch
paths they replace: decode attention against the torch backend's gather + SDPA, RMSNorm / SiLU
/ RoPE against HF's eager formulas, bit for bit where the kernels claim it, and the log-sum-exp
sampler against log_softmax."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from gpu_runtime import native
from gpu_runtime.attention import AttentionMetadata, Scratch
from gpu_runtime.backends import CpuBackend, TorchBackend, cpu
from gpu_runtime.config import RopeConfig
from gpu_runtime.layers import rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.skipif(native.load() is None, reason="native kernels unavailable")
LIB = native.load()
CPU = CpuBackend(LIB) if LIB is not None else None  # the kernels, called directly
TORCH = TorchBackend("cpu")  # the reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between same-dtype tensors (bf16/fp16 as
    their 16-bit patterns, which are ordered like the values for one sign)."""
    assert a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16), (a.dtype, b.dtype)
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    same_sign = (ia >= 0) == (ib >= 0)
    assert bool(same_sign[(a != 0) & (b != 0)].all()), "sign flip"
    return int((ia - ib).abs().max())


def decode_case(dtype, batch, heads, kv_heads, head_dim, block_size=16, num_blocks=64, seed=0):
    """Random cache, scrambled block tables and ragged context lengths for one decode step."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    lens = [int(x) for x in torch.randint(1, 5 * block_size, (batch,), generator=g)]
    width = max(-(-n // block_size) for n in lens)
    blocks = torch.randperm(num_blocks, generator=g)[:batch * width].view(batch, width)
    tables = blocks.contiguous()  # non-consecutive physical blocks, distinct per sequence
    slots = torch.tensor([int(tables[i, (n - 1) // block_size]) * block_size +
                          (n - 1) % block_size for i, n in enumerate(lens)])
    q, k, v = (torch.randn(batch, h, head_dim, generator=g).to(dtype)
               for h in (heads, kv_heads, kv_heads))
    meta = AttentionMetadata(torch.tensor([n - 1 for n in lens]), slots, tables, lens,
                             [1] * batch, block_size, Scratch())
    return cache, q, k, v, meta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 64), (4, 1, 128),
                                                     (6, 3, 12)])  # 12: the portable path
def test_decode_attention_matches_the_torch_path(dtype, batch, heads, kv_heads, head_dim):
    check_decode_attention(dtype, *decode_case(dtype, batch, heads, kv_heads, head_dim))


def check_decode_attention(dtype, cache, q, k, v, meta) -> None:
    ref_cache = cache.clone()
    TORCH.write_kv(ref_cache, k, v, meta)
    expected = TORCH.cached_attention(q, ref_cache, meta)
    out = CPU.native_decode_attention(q, k, v, cache, meta.slot_mapping, meta.block_tables,
                                   torch.tensor(meta.context_lens))
    assert out is not None and out.dtype == dtype and out.shape == expected.shape
    assert torch.equal(cache, ref_cache), "this step's keys/values were not written alike"
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    else:  # both compute in float32 and round once: at most one ulp apart
        assert ulp_diff(out, expected) <= 1


PAIR_MIN_WORK = 1 << 18  # attention.c: a batch with this much work splits across two threads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(16, 16), (32, 8)])
def test_decode_attention_of_a_large_batch_split_across_two_threads(dtype, heads, kv_heads):
    """Each sequence's result is the same bit for bit whether its batch was split across the
    helper thread or it ran alone (a batch of one never splits)."""
    cache, q, k, v, meta = decode_case(dtype, 8, heads, kv_heads, 64, block_size=64,
                                       num_blocks=64)
    lens = torch.tensor(meta.context_lens)
    assert int(lens.sum()) * heads * 64 >= PAIR_MIN_WORK, "too small to split"
    together = CPU.native_decode_attention(q, k, v, cache, meta.slot_mapping, meta.block_tables,
                                        lens)
    for i in range(8):
        alone = CPU.native_decode_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], cache,
                                         meta.slot_mapping[i:i + 1],
                                         meta.block_tables[i:i + 1].contiguous(), lens[i:i + 1])
        assert torch.equal(alone[0], together[i]), f"sequence {i} differs"
    expected = TORCH.cached_attention(q, cache, meta)  # the torch backend, float32 within the batch
    torch.testing.assert_close(together.float(), expected.float(), rtol=0,
                               atol=1e-5 if dtype == torch.float32 else 4e-3)


def test_decode_attention_from_several_threads_at_once():
    """Callers racing for the kernel's helper thread (the loser runs both halves itself) get
    what each gets alone, bit for bit."""
    cases = [decode_case(torch.bfloat16, 8, 16, 16, 64, block_size=64, num_blocks=64, seed=s)
             for s in range(6)]

    def run(case):
        cache, q, k, v, meta = case
        return CPU.native_decode_attention(q, k, v, cache.clone(), meta.slot_mapping,
                                        meta.block_tables, torch.tensor(meta.context_lens))

    alone = [run(c) for c in cases]
    with ThreadPoolExecutor(3) as pool:
        for _ in range(5):
            for i, out in enumerate(pool.map(run, cases)):
                assert torch.equal(out, alone[i]), f"case {i} differs when run concurrently"


def test_decode_attention_reads_rows_a_token_apart_in_a_fused_qk_tensor():
    cache, q, k, v, meta = decode_case(torch.bfloat16, 3, 4, 2, 64)
    qk = torch.cat((q, k), dim=1)  # (tokens, heads + kv_heads, hd): q and k are strided views
    ref_cache = cache.clone()
    TORCH.write_kv(ref_cache, k, v, meta)
    expected = TORCH.cached_attention(q, ref_cache, meta)
    out = CPU.native_decode_attention(qk[:, :4], qk[:, 4:], v, cache, meta.slot_mapping,
                                   meta.block_tables, torch.tensor(meta.context_lens))
    assert torch.equal(cache, ref_cache)
    assert ulp_diff(out, expected) <= 1


def hf_rms_norm(x, weight, eps):
    """HF LlamaRMSNorm.forward, eagerly."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8, 32])
def test_rms_norm_with_and_without_residual(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x, delta = (torch.randn(rows, 1024, generator=g).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(1024, generator=g)).to(dtype)
    total, out = CPU.native_rms_norm(x, weight, 1e-6, delta)
    assert torch.equal(total, x + delta)  # the residual add rounds like torch's
    assert CPU.native_rms_norm(x, weight, 1e-6)[0] is x
    for got, inp in ((out, x + delta), (CPU.native_rms_norm(x, weight, 1e-6)[1], x)):
        expected = hf_rms_norm(inp, weight, 1e-6)
        if dtype == torch.float32:  # only the mean of squares is summed in another order
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        else:
            assert ulp_diff(got, expected) <= 1
            assert (got == expected).float().mean() >= 0.999


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_rounds_like_the_two_torch_ops(dtype):
    g = torch.Generator().manual_seed(1)
    gate, up = (4 * torch.randn(8, 2816, generator=g)).to(dtype), torch.randn(8, 2816).to(dtype)
    out = CPU.native_silu_mul(gate, up)
    expected = F.silu(gate) * up
    if dtype == torch.float32:  # exp within a few ulp of torch's
        torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-7)
    else:
        assert ulp_diff(out, expected) <= 1
        assert (out == expected).float().mean() >= 0.999


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 8])
def test_rope_is_bit_exact_with_the_hf_formula(dtype, tokens):
    g = torch.Generator().manual_seed(tokens)
    q = torch.randn(tokens, 8, 64, generator=g).to(dtype)
    k = torch.randn(tokens, 2, 64, generator=g).to(dtype)
    positions = torch.randint(0, 2000, (tokens,), generator=g)
    cos, sin = rope_cos_sin(rope_inv_freq(RopeConfig(), 64), positions, dtype)

    def hf(x):  # q * cos + rotate_half(q) * sin
        return x * cos + torch.cat((-x[..., 32:], x[..., :32]), dim=-1) * sin

    expected_q, expected_k = hf(q), hf(k)
    assert CPU.native_rope_qk(q, k, cos, sin)  # in place
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)


def test_logits_stats_give_torch_argmax_and_log_softmax():
    g = torch.Generator().manual_seed(2)
    logits = 5 * torch.randn(8, 32003, generator=g)
    logits[3, 100] = logits[3, 31000] = logits[3].max() + 1  # a tie: the first index wins
    argmax, lse = CPU.native_logits_stats(logits)
    assert torch.equal(argmax, logits.argmax(-1)) and int(argmax[3]) == 100
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-6, atol=1e-5)


def test_large_inputs_stay_on_torch():
    x = torch.randn(cpu.MAX_TOKENS + 1, 64)
    assert CPU.native_rms_norm(x, torch.ones(64), 1e-6) is None
    assert CPU.native_silu_mul(x, x) is None and CPU.native_silu_mul(x[:1], x[:1]) is None
    q = torch.randn(cpu.MAX_TOKENS + 1, 2, 8)
    assert not CPU.native_rope_qk(q, q, torch.ones(q.shape[0], 1, 8), torch.ones(q.shape[0], 1, 8))
    assert CPU.native_rms_norm(x.double(), torch.ones(64).double(), 1e-6) is None
