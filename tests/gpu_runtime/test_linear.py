"""The engine's linear kernel (``gpu_runtime.layers.linear``, the backend's ``linear``) against
``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu_runtime import backends
from gpu_runtime.backends import torch_backend
from gpu_runtime.layers import Linear, linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 8, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(dtype, rows, bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1024, generator=g).to(dtype)
    w = (torch.randn(512, 1024, generator=g) * 0.03).to(dtype)  # large enough for oneDNN
    b = torch.randn(512, generator=g).to(dtype) if bias else None
    with torch.inference_mode():
        out, expected = linear(x, w, b), F.linear(x, w, b)
    assert out.dtype == dtype and out.shape == (rows, 512)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_linear_takes_strided_inputs_and_weights():
    x = torch.randn(8, 2048)[:, ::2]  # (8, 1024), rows 2048 apart
    w = (torch.randn(1024, 512) * 0.03).t()  # (512, 1024), column-major
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch_backend.ONEDNN_LINEAR is None, reason="this torch build has no oneDNN")
def test_float32_on_cpu_runs_onednn_on_the_stored_weight(monkeypatch):
    calls = []
    real = torch_backend.ONEDNN_LINEAR
    backend = backends.for_device(torch.device("cpu"))
    monkeypatch.setattr(backend, "onednn", lambda *a: calls.append(a) or real(*a))
    layer = Linear(1024, torch_backend.ONEDNN_MIN_WEIGHT // 1024, bias=True)
    layer(torch.randn(3, 1024))
    assert len(calls) == 1 and calls[0][1] is layer.weight, "the weight itself, not a copy"
    layer.to(torch.bfloat16)(torch.randn(3, 1024, dtype=torch.bfloat16))
    Linear(16, 4, bias=False)(torch.randn(3, 16))
    assert len(calls) == 1, "bf16 and small matrices keep F.linear"


def test_linear_is_built_without_gradients():
    assert not any(p.requires_grad for p in Linear(4, 4, bias=True).parameters())
