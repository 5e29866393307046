"""Fused q/k/v and gate/up projections (``layers.FusedLinear``, ``Stage.fuse_projections``):
the loader fuses them where weights are copied to the device anyway (CUDA); forced here on CPU,
the fused model gives the unfused model's logits, costs no weight memory of its own, and a
stage that adopts fused weights views them instead of copying."""

from __future__ import annotations

import torch

from gpu_runtime.demo_model import DemoModelSpec, make_demo_model
from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.layers import FusedLinear, Linear, fuse_rows
from gpu_runtime.sampling import SamplingParams


def greedy(engine: LLMEngine, prompt: list[int]) -> list:
    engine.add_request("r", prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    out: list = []
    while engine.has_unfinished():
        for o in engine.step():
            out += zip(o.new_token_ids, o.new_logprobs, strict=True)
    return out


def test_a_fused_model_gives_the_unfused_logits(tmp_path):
    model = make_demo_model(tmp_path / "m", DemoModelSpec(arch="llama", size="tiny", seed=3))
    with LLMEngine(EngineConfig(model=str(model), kv_cache_bytes=4 << 20)) as plain:
        assert plain.runner.stage.fuse_projections() == 0  # CPU: parameters alias the cache
        expected = greedy(plain, [1, 2, 3, 4, 5])
    with LLMEngine(EngineConfig(model=str(model), kv_cache_bytes=4 << 20)) as engine:
        stage = engine.runner.stage
        attn = stage.model.layers["0"].self_attn
        q_before = attn.q_proj.weight.clone()
        assert stage.fuse_projections(force=True) == 2 * stage.config.num_layers
        assert attn.qkv is not None and stage.model.layers["0"].mlp.gate_up is not None
        # the parts are views of the fused weight, with their own values
        assert attn.q_proj.weight.data_ptr() == attn.qkv.weight.data_ptr()
        assert torch.equal(attn.q_proj.weight, q_before)
        got = greedy(engine, [1, 2, 3, 4, 5])
    assert [t for t, _ in got] == [t for t, _ in expected]
    torch.testing.assert_close([p for _, p in got], [p for _, p in expected], rtol=1e-5,
                               atol=1e-5)


def test_adjacent_weights_are_viewed_not_copied():
    a, b, c = (Linear(4, n, True) for n in (3, 2, 2))
    for lin in (a, b, c):
        torch.nn.init.normal_(lin.weight)
        torch.nn.init.normal_(lin.bias)
    x = torch.randn(5, 4)
    expected = [lin(x) for lin in (a, b, c)]
    fused = FusedLinear(a, b, c)
    for got, want in zip(fused(x), expected, strict=True):
        torch.testing.assert_close(got, want)
    # fusing the views again (a stage adopting another's fused weights) copies nothing
    again = fuse_rows([a.weight, b.weight, c.weight])
    assert again.data_ptr() == fused.weight.data_ptr() and torch.equal(again, fused.weight)
    apart = fuse_rows([c.weight, a.weight])  # not in storage order: a copy
    assert apart.data_ptr() != fused.weight.data_ptr()
    assert torch.equal(apart, torch.cat([c.weight, a.weight]))
