"""The backends (``gpu_runtime.backends``): which one a device gets, the CPU backend's ops
against the torch backend's (the native kernel where it applies, the torch op itself where it
does not), indices outside the cache rejected before anything is written, and the model code
reaching kernels only through the backend."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from gpu_runtime import backends, native
from gpu_runtime.attention import AttentionMetadata, Scratch, paged_attention
from gpu_runtime.backends import CpuBackend, TorchBackend, cpu
from gpu_runtime.config import RopeConfig
from gpu_runtime.layers import rope_cos_sin, rope_inv_freq
from tests.gpu_runtime.test_kernels import DTYPES, decode_case, ulp_diff

ROOT = Path(__file__).resolve().parents[2]
LIB = native.load()
needs_lib = pytest.mark.skipif(LIB is None, reason="native kernels unavailable")
TORCH = TorchBackend("cpu")


@pytest.fixture
def cpu_backend() -> CpuBackend:
    assert LIB is not None
    return CpuBackend(LIB)


@pytest.fixture
def no_native(monkeypatch):
    """``HYDRA_NATIVE=0`` for one test, the backends chosen afresh before and after it."""
    monkeypatch.setenv("HYDRA_NATIVE", "0")
    backends.reset()
    yield
    monkeypatch.delenv("HYDRA_NATIVE")
    backends.reset()


# ---- dispatch ----------------------------------------------------------------------------

@needs_lib
def test_cpu_gets_the_native_backend_once():
    backend = backends.for_device(torch.device("cpu"))
    assert type(backend) is CpuBackend and backend.name == "cpu:native", backend
    assert backends.for_device(torch.device("cpu")) is backend  # built once per device type


def test_cuda_gets_the_cuda_backend():
    """The choice only: no CUDA op runs (none may be here)."""
    from gpu_runtime.backends import triton_decode
    from gpu_runtime.backends.cuda import CudaBackend

    backend = backends.for_device(torch.device("cuda", 0))
    assert type(backend) is CudaBackend and backend.name == "torch:cuda", backend
    # the Triton kernel where it runs (here only under the interpreter of tests/conftest.py)
    assert backend.paged_kernel is triton_decode.available()
    assert backends.for_device(torch.device("cuda", 1)) is backend
    # the CPU-only torch choices are off: attention in the model dtype, F.linear
    assert (backend.upcasts_attention, backend.onednn) == (False, None)


def test_switched_off_the_cpu_gets_the_torch_backend(no_native):
    backend = backends.for_device(torch.device("cpu"))
    assert type(backend) is TorchBackend and backend.name == "torch:cpu", backend
    assert backend.upcasts_attention and native.load() is None


def test_switched_off_the_model_code_runs_the_torch_ops(no_native):
    """Paged attention on CPU with HYDRA_NATIVE=0 is the torch backend's, bit for bit."""
    cache, q, k, v, meta = decode_case(torch.bfloat16, 4, 4, 2, 64)
    expected_cache = cache.clone()
    expected = TORCH.decode_attention(q, k, v, expected_cache, meta)
    meta = decode_case(torch.bfloat16, 4, 4, 2, 64)[-1]  # the same step, its lazy state unset
    out = paged_attention(q, k, v, cache, meta)
    assert torch.equal(out, expected) and torch.equal(cache, expected_cache)


# ---- the CPU backend's ops equal the torch backend's ---------------------------------------

def assert_matches(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5,
                   atol: float = 1e-6) -> None:
    """float32 within the kernels' tolerances; bf16/fp16 at most one ulp apart."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, (got, expected)
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    else:
        assert ulp_diff(got, expected) <= 1


@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8, cpu.MAX_TOKENS + 1])  # the last: torch's op
def test_rms_norm(cpu_backend, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x, delta = (torch.randn(rows, 256, generator=g).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(256, generator=g)).to(dtype)
    for d in (None, delta):
        total, normed = cpu_backend.rms_norm(x, weight, 1e-6, d)
        ref_total, ref_normed = TORCH.rms_norm(x, weight, 1e-6, d)
        assert torch.equal(total, ref_total)
        if rows > cpu.MAX_TOKENS:
            assert torch.equal(normed, ref_normed), "a fallback runs the torch op itself"
        assert_matches(normed, ref_normed)


@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8, 40])  # 1 and 40: outside SILU_TOKENS, torch's op
def test_silu_mul(cpu_backend, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    gate, up = ((4 * torch.randn(rows, 704, generator=g)).to(dtype) for _ in range(2))
    got, expected = cpu_backend.silu_mul(gate, up), TORCH.silu_mul(gate, up)
    if rows not in cpu.SILU_TOKENS:
        assert torch.equal(got, expected)
    assert_matches(got, expected, rtol=2e-6, atol=1e-6)


@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 8, cpu.MAX_TOKENS + 1])
def test_rope_qk(cpu_backend, dtype, tokens):
    g = torch.Generator().manual_seed(tokens)
    q = torch.randn(tokens, 8, 64, generator=g).to(dtype)
    k = torch.randn(tokens, 2, 64, generator=g).to(dtype)
    cos, sin = rope_cos_sin(rope_inv_freq(RopeConfig(), 64),
                            torch.randint(0, 2000, (tokens,), generator=g), dtype)
    ref_q, ref_k = TORCH.rope_qk(q, k, cos, sin)
    got_q, got_k = cpu_backend.rope_qk(q.clone(), k.clone(), cos, sin)
    for got, expected, x in ((got_q, ref_q, q), (got_k, ref_k, k)):
        if tokens > cpu.MAX_TOKENS:
            assert torch.equal(got, expected)
        # the native kernel rounds each product (as HF does), torch's addcmul once: they
        # differ by a rounding of a product, at most an ulp of the largest input (which is
        # many ulps of a result near zero)
        atol = torch.finfo(dtype).eps * float(x.abs().max())
        torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=atol)


@needs_lib
def test_logits_stats(cpu_backend):
    logits = 5 * torch.randn(4, 5003, generator=torch.Generator().manual_seed(3))
    argmax, lse = cpu_backend.logits_stats(logits)
    ref_argmax, ref_lse = TORCH.logits_stats(logits)
    assert torch.equal(argmax, ref_argmax)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-5)
    double = logits.double()  # not a kernel dtype: the torch op
    assert all(torch.equal(a, b) for a, b in zip(cpu_backend.logits_stats(double),
                                                 TORCH.logits_stats(double), strict=True))


@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim", [(1, 4, 4, 64), (8, 8, 2, 64),
                                                           (3, 6, 3, 12)])
def test_decode_attention(cpu_backend, dtype, batch, heads, kv_heads, head_dim):
    cache, q, k, v, meta = decode_case(dtype, batch, heads, kv_heads, head_dim, seed=batch)
    ref_cache = cache.clone()
    expected = TORCH.decode_attention(q, k, v, ref_cache, meta)
    got = cpu_backend.decode_attention(q, k, v, cache, meta)
    assert torch.equal(cache, ref_cache), "this step's keys/values were not written alike"
    assert_matches(got, expected)


@needs_lib
def test_decode_attention_of_another_dtype_is_the_torch_op(cpu_backend):
    cache, q, k, v, meta = decode_case(torch.float64, 3, 4, 2, 16)
    ref_cache = cache.clone()
    expected = TORCH.decode_attention(q, k, v, ref_cache, meta)
    assert torch.equal(cpu_backend.decode_attention(q, k, v, cache, meta), expected)
    assert torch.equal(cache, ref_cache)


@needs_lib
def test_linear_prefill_and_cached_attention_are_the_torch_ops(cpu_backend):
    """Ops without a native kernel are inherited, not reimplemented."""
    for name in ("linear", "write_kv", "prefill_attention", "cached_attention"):
        assert getattr(CpuBackend, name) is getattr(TorchBackend, name), name


# ---- indices outside the cache ----------------------------------------------------------

BACKENDS = [pytest.param("cpu", marks=needs_lib), "torch"]


def backend_named(name: str) -> TorchBackend:
    assert name == "torch" or LIB is not None, name
    return TORCH if name == "torch" else CpuBackend(LIB)


def corrupt(meta: AttentionMetadata, what: str, num_blocks: int, block_size: int) -> tuple:
    """The step with one entry out of range -> (meta, exception type, what its message
    names)."""
    lens = list(meta.context_lens)
    slots, tables = meta.slot_mapping.clone(), meta.block_tables.clone()
    width = tables.shape[1]
    if what == "slot past the end":
        slots[1] = num_blocks * block_size
        error, words = IndexError, (f"slot_mapping[1] = {num_blocks * block_size}",
                                    f"[0, {num_blocks * block_size})")
    elif what == "negative slot":
        slots[2] = -1
        error, words = IndexError, ("slot_mapping[2] = -1", f"[0, {num_blocks * block_size})")
    elif what == "block past the end":
        tables[1, (lens[1] - 1) // block_size] = num_blocks
        error, words = IndexError, (f"block_tables[1, {(lens[1] - 1) // block_size}] = "
                                    f"{num_blocks}", f"[0, {num_blocks})")
    elif what == "context too long":
        lens[0] = width * block_size + 1
        error, words = ValueError, (f"context_lens[0] = {width * block_size + 1}",
                                    f"[1, {width * block_size}]")
    else:
        assert what == "empty context", what
        lens[2] = 0
        error, words = ValueError, ("context_lens[2] = 0", f"[1, {width * block_size}]")
    positions = torch.tensor([n - 1 for n in lens])
    return (AttentionMetadata(positions, slots, tables, lens, [1] * len(lens), block_size,
                              Scratch()), error, words)


CORRUPTIONS = ["slot past the end", "negative slot", "block past the end", "context too long",
               "empty context"]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("what", CORRUPTIONS)
def test_decode_attention_rejects_an_index_outside_the_cache(backend_name, what):
    cache, q, k, v, meta = decode_case(torch.bfloat16, 4, 4, 2, 64, num_blocks=32, seed=5)
    meta, error, words = corrupt(meta, what, 32, 16)
    before = cache.clone()
    with pytest.raises(error) as info:
        backend_named(backend_name).decode_attention(q, k, v, cache, meta)
    assert all(w in str(info.value) for w in words), (str(info.value), words)
    assert torch.equal(cache, before), "the cache was written"


@pytest.mark.parametrize("what", ["slot past the end", "negative slot", "block past the end"])
def test_torch_write_kv_rejects_an_index_outside_the_cache(what):
    cache, q, k, v, meta = decode_case(torch.float32, 4, 4, 2, 16, num_blocks=32, seed=6)
    meta, error, words = corrupt(meta, what, 32, 16)
    before = cache.clone()
    with pytest.raises(error) as info:
        TORCH.write_kv(cache, k, v, meta)
    assert all(w in str(info.value) for w in words), (str(info.value), words)
    assert torch.equal(cache, before)


@needs_lib
def test_the_kernel_follows_only_the_blocks_a_sequence_uses(cpu_backend):
    """A shorter sequence's padding entries are never read, so they are not checked (the
    torch backend's gather reads, and checks, the longest context's width of every row)."""
    cache, q, k, v, meta = decode_case(torch.float32, 3, 4, 2, 16, num_blocks=32, seed=7)
    lens = [1, *meta.context_lens[1:]]  # sequence 0: one token, in its first block
    slots = meta.slot_mapping.clone()
    slots[0] = int(meta.block_tables[0, 0]) * 16
    meta = AttentionMetadata(torch.tensor([n - 1 for n in lens]), slots, meta.block_tables,
                             lens, [1] * 3, 16, Scratch())
    assert meta.block_tables.shape[1] > 1, "no padding in sequence 0's row"
    expected = cpu_backend.decode_attention(q, k, v, cache.clone(), meta)
    meta.block_tables[0, 1:] = 10**6
    assert torch.equal(cpu_backend.decode_attention(q, k, v, cache, meta), expected)


# ---- the model code reaches kernels only through its backend ------------------------------

MODEL_CODE = ["layers.py", "attention.py", "sampling.py",
              *(f"models/{p.name}" for p in sorted((ROOT / "gpu_runtime" / "models").glob("*.py")))]


@pytest.mark.parametrize("path", [*MODEL_CODE, "model_runner.py", "stage.py"])
def test_model_code_imports_no_kernels(path):
    imported = imports_of(path)
    assert not imported & {"gpu_runtime.native", "gpu_runtime.kernels"}, (path, imported)
    assert not (ROOT / "gpu_runtime" / "kernels.py").exists()


def test_the_import_reader_sees_the_backends_import():
    """Guards the test above against passing because nothing was read."""
    assert "gpu_runtime.backends" in imports_of("layers.py")
    assert "gpu_runtime.native" in imports_of("backends/__init__.py")


@pytest.mark.parametrize("path", MODEL_CODE)
def test_layers_models_attention_and_sampler_pick_no_kernel_by_device(path):
    source = (ROOT / "gpu_runtime" / path).read_text()
    assert "device.type" not in source and ".is_cpu" not in source and ".is_cuda" not in source


def imports_of(path: str) -> set[str]:
    """Every module ``path`` imports, and every ``module.name`` it imports from one."""
    imported = set()
    for node in ast.walk(ast.parse((ROOT / "gpu_runtime" / path).read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{a.name}" for a in node.names} | {node.module or ""}
    return imported


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("host_checked", [True, False])
def test_the_cuda_backends_decode_is_the_torch_backends(host_checked):
    """The CUDA backend's decode (the Triton kernel over the paged cache, run by Triton's
    interpreter on CPU tensors here) writes the step's k/v and attends as the torch backend
    does; a step checked on the host skips the device check, one built without it is checked."""
    from gpu_runtime.backends import triton_decode
    from gpu_runtime.backends.cuda import CudaBackend

    if not triton_decode.is_interpreting():
        pytest.skip("Triton compiles in this run (TRITON_INTERPRET unset; tests/conftest.py "
                    "sets it in runs without CUDA): this test runs the kernel on CPU tensors")
    cache, q, k, v, meta = decode_case(torch.float32, 3, 4, 2, 32)
    ref_cache = cache.clone()
    ref_meta = decode_case(torch.float32, 3, 4, 2, 32)[4]
    expected = TorchBackend("cuda").decode_attention(q, k, v, ref_cache, ref_meta)
    if host_checked:
        meta.checked_cache = (cache.shape[1], cache.shape[2])
    got = CudaBackend(paged_kernel=True).decode_attention(q, k, v, cache, meta)
    assert torch.equal(cache, ref_cache)  # the same k/v written to the same slots
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if not host_checked:
        assert meta.checked_cache == (cache.shape[1], cache.shape[2])
        bad = decode_case(torch.float32, 3, 4, 2, 32)[4]
        bad.slot_mapping[0] = cache.shape[1] * cache.shape[2]
        with pytest.raises(IndexError, match="outside the KV cache"):
            CudaBackend(paged_kernel=True).decode_attention(q, k, v, cache.clone(), bad)
