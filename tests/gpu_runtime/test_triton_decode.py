"""The Triton decode kernel (``gpu_runtime.backends.triton_decode``) against a float64 gather +
softmax written here and against the torch backend's cached attention: under Triton's
interpreter on CPU tensors (``TRITON_INTERPRET=1``, small sizes), and compiled on CUDA, plus a
CUDA-graph capture and replay, where a GPU exists. Skipped without triton.

Tolerances, against the float64 reference on the same (rounded) inputs: the kernel accumulates
in float32 and rounds the output once, so float32 is within 1e-5 and bf16 / fp16 within the
output's half ulp (relative 2^-8 / 2^-11), doubled for margin, plus 1e-5. Triton 3.7's
interpreter truncates float32 -> bf16 (its cast drops the rounding mode; compiled code rounds
to nearest even), so there bf16 is checked to one ulp (relative 2^-7), the bound of truncation.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from gpu_runtime.attention import AttentionMetadata
from gpu_runtime.backends import TorchBackend

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (`pip install "
                                  "--no-deps triton==3.7.1`): the kernel cannot be built")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="no CUDA device")
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2 ** -7, 1e-5),
              torch.float16: (2 ** -10, 1e-5)}  # (rtol, atol)
BLOCK_SIZE = 8
# 1, a non-multiple of the block size, exactly two blocks, several blocks (and tiles of the
# kernel's 32 or 64 positions)
CONTEXT_LENS = [1, 13, 16, 70]


@pytest.fixture
def interpreter():
    """Triton's interpreter: the kernel runs on CPU tensors. Triton chooses when it is
    imported (tests/conftest.py asks for the interpreter in a run without CUDA), so a run
    with CUDA skips these."""
    from gpu_runtime.backends import triton_decode
    if not triton_decode.is_interpreting():
        pytest.skip("Triton compiles in this run (TRITON_INTERPRET unset; tests/conftest.py "
                    "sets it in runs without CUDA): the interpreter tests need it")
    return triton_decode


@pytest.fixture
def compiled():
    """The compiled kernel, on CUDA tensors."""
    from gpu_runtime.backends import triton_decode
    if triton_decode.is_interpreting():
        pytest.skip("this run interprets Triton kernels (TRITON_INTERPRET=1)")
    return triton_decode


def decode_case(dtype, heads, kv_heads, head_dim, context_lens=CONTEXT_LENS, seed=0,
                device="cpu", table_dtype=torch.int64):
    """q (seqs, heads, hd); a cache whose every slot outside the contexts is NaN, including
    the tails of last blocks and whole blocks no sequence owns; block tables of shuffled
    blocks, one column wider than the longest context, padded with an unowned (NaN) block. (A
    padding id outside the cache would make a kernel that reads it crash the process rather
    than fail the test.)"""
    g = torch.Generator().manual_seed(seed)
    widths = [-(-n // BLOCK_SIZE) for n in context_lens]
    width, num_blocks = max(widths) + 1, sum(widths) + 5  # 5 blocks nobody owns
    cache = torch.full((2, num_blocks, BLOCK_SIZE, kv_heads, head_dim), float("nan"))
    blocks = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.full((len(context_lens), width), blocks.pop(), dtype=table_dtype)
    for seq, n in enumerate(context_lens):
        for column in range(widths[seq]):
            block = blocks.pop()
            tables[seq, column] = block
            used = min(BLOCK_SIZE, n - column * BLOCK_SIZE)
            cache[:, block, :used] = torch.randn(2, used, kv_heads, head_dim, generator=g)
    q = torch.randn(len(context_lens), heads, head_dim, generator=g)
    ctx = torch.tensor(context_lens, dtype=table_dtype)
    return (t.to(device) for t in (q.to(dtype), cache.to(dtype), tables, ctx))


def reference(q, cache, tables, context_lens, scale, window=None) -> torch.Tensor:
    """float64 gather of each context (positions in the window) + softmax -> (seqs, heads*hd)."""
    seqs, heads, head_dim = q.shape
    group = heads // cache.shape[3]
    rows = []
    for seq, n in enumerate(context_lens.tolist()):
        pos = torch.arange(max(0, n - window) if window else 0, n)
        blocks = tables[seq].cpu()[pos // BLOCK_SIZE]
        keys, values = cache.cpu().double()[:, blocks, pos % BLOCK_SIZE]  # (n, kv_heads, hd)
        keys, values = (t.repeat_interleave(group, dim=1) for t in (keys, values))
        scores = torch.einsum("hd,nhd->hn", q[seq].cpu().double(), keys) * scale
        rows.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values).reshape(-1))
    return torch.stack(rows)


def check(kernel, dtype, heads, kv_heads, head_dim, window=None, **case) -> None:
    q, cache, tables, ctx = decode_case(dtype, heads, kv_heads, head_dim, **case)
    scale = head_dim ** -0.5
    out = kernel.paged_decode_attention(q, cache, tables, ctx, scale, window)
    assert out.shape == (q.shape[0], heads * head_dim) and out.dtype == dtype, (
        out.shape, out.dtype)
    assert bool(out.isfinite().all()), "a slot outside some context was read"
    rtol, atol = TOLERANCES[dtype]
    expected = reference(q, cache, tables, ctx, scale, window)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=rtol, atol=atol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_interpreter_matches_float64_reference(interpreter, dtype, heads, kv_heads, head_dim):
    check(interpreter, dtype, heads, kv_heads, head_dim)


@needs_triton
@pytest.mark.parametrize("window", [1, 5, 16, 100])  # one key, mid-block, a block, all
def test_interpreter_sliding_window(interpreter, window):
    check(interpreter, torch.float32, 4, 2, 64, window=window)


@needs_triton
def test_interpreter_fp16_int32_tables_odd_head_dim(interpreter):
    # head_dim 80 is padded to a 128 lane tile inside the kernel and masked
    check(interpreter, torch.float16, 6, 3, 80, table_dtype=torch.int32, seed=1)


@needs_triton
def test_interpreter_matches_torch_backend(interpreter):
    """The kernel and the torch path that runs today (gather + SDPA) agree on one decode step."""
    q, cache, tables, ctx = decode_case(torch.float32, 8, 2, 64, seed=2)
    cache = torch.nan_to_num(cache)  # the torch path gathers whole blocks: NaN would spread
    lens = ctx.tolist()
    slots = torch.tensor([int(tables[i, (n - 1) // BLOCK_SIZE]) * BLOCK_SIZE +
                          (n - 1) % BLOCK_SIZE for i, n in enumerate(lens)])
    meta = AttentionMetadata(ctx - 1, slots, tables, lens, [1] * len(lens), BLOCK_SIZE)
    expected = TorchBackend("cpu").cached_attention(q, cache, meta)
    out = interpreter.paged_decode_attention(q, cache, tables, ctx, 64 ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_triton
def test_interpreter_empty_context_gives_zeros(interpreter):
    """A padded row of a captured batch (context 0) reads nothing and returns zeros."""
    q, cache, tables, ctx = decode_case(torch.float32, 4, 4, 64, context_lens=[5, 9])
    ctx[1] = 0
    out = interpreter.paged_decode_attention(q, cache, tables, ctx, 0.125)
    assert torch.equal(out[1], torch.zeros_like(out[1])), out[1]
    torch.testing.assert_close(out[0].double(), reference(q, cache, tables, ctx, 0.125)[0],
                               rtol=1e-5, atol=1e-5)


@needs_triton
def test_rejects_shapes_it_does_not_take(interpreter):
    q, cache, tables, ctx = decode_case(torch.float32, 6, 4, 64, context_lens=[3])
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        interpreter.paged_decode_attention(q, cache, tables, ctx, 0.125)
    q, cache, tables, ctx = decode_case(torch.float32, 4, 4, 64, context_lens=[3])
    with pytest.raises(ValueError, match="int32 or int64"):
        interpreter.paged_decode_attention(q, cache, tables.float(), ctx, 0.125)
    with pytest.raises(ValueError, match="sliding_window=0"):
        interpreter.paged_decode_attention(q, cache, tables, ctx, 0.125, sliding_window=0)


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"  # `import triton` raises ImportError
            "from gpu_runtime.backends import triton_decode as t\n"
            "try:\n"
            "    t.paged_decode_attention(None, None, None, None, 1.0)\n"
            "except RuntimeError as e:\n"
            "    print(t.available(), 'needs triton' in str(e))\n")
    assert run_python(code) == "False True"


def test_cpu_path_never_imports_it():
    code = ("import sys, torch\n"
            "from gpu_runtime import attention, engine, model_runner\n"
            "from gpu_runtime.backends import for_device\n"
            "for_device(torch.device('cpu'))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton' "
            "or m.endswith('triton_decode')))\n")
    assert run_python(code) == "[]"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (32, 8)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_matches_float64_reference(compiled, dtype, heads, kv_heads, head_dim):
    check(compiled, dtype, heads, kv_heads, head_dim, device="cuda")
    check(compiled, dtype, heads, kv_heads, head_dim, device="cuda", window=5,
          context_lens=[1, 3, 200, 1000, 4097], table_dtype=torch.int32)


@needs_cuda
def test_cuda_graph_replay_follows_new_context_lens(compiled):
    """Captured once, replayed after the caller rewrote the tables and lengths in place: the
    launch reads them on the device, so the replay sees the new contexts."""
    q, cache, tables, ctx = decode_case(torch.bfloat16, 8, 2, 128, context_lens=[40, 7, 300],
                                        device="cuda")
    kernel = compiled.paged_decode_attention
    kernel(q, cache, tables, ctx, 128 ** -0.5)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(q, cache, tables, ctx, 128 ** -0.5)
    # the first and last rows swap blocks; lengths stay within the filled slots of each
    tables.copy_(tables.flip(0))
    ctx.copy_(torch.tensor([299, 6, 40], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    rtol, atol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out.double().cpu(),
                               reference(q, cache, tables, ctx, 128 ** -0.5), rtol=rtol, atol=atol)
