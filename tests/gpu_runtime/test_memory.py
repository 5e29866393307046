"""The accounting of a worker's share (gpu_runtime/memory.py): weights, a workspace for the
largest batch, and the KV cache in what is left."""

from __future__ import annotations

import pytest

from gpu_runtime.config import parse_config
from gpu_runtime.demo_model import LLAMA_SIZES
from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.memory import (
    MemoryBudget,
    ShareTooSmallError,
    profile_forward,
    stage_report,
    workspace_bytes,
)

LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=4096)


def test_the_kv_cache_gets_what_the_weights_and_the_workspace_leave():
    budget = MemoryBudget(share=100, weights=60, workspace=25)
    assert budget.kv_bytes == 15
    assert budget.check(block_bytes=15) is budget
    with pytest.raises(ShareTooSmallError, match=r"share of 100 bytes .* allowed: >= 101"):
        budget.check(block_bytes=16)


def test_the_workspace_bound_grows_with_the_batch_and_the_head():
    config = parse_config(LLAMA_7B)
    full = workspace_bytes(config, 2)
    # a 4096-token bf16 batch through one Llama-2-7B layer: hundreds of MB, not GBs
    assert 200 << 20 < full < 1 << 30
    assert workspace_bytes(config, 2, max_tokens=512) < full / 4
    assert workspace_bytes(config, 2, last=False) == full - 2 * 64 * 32000 * 4  # no logits


def test_the_profile_forward_runs_the_largest_batch_the_cache_holds(tmp_path):
    from gpu_runtime.demo_model import DemoModelSpec, make_demo_model

    make_demo_model(tmp_path / "m", DemoModelSpec(arch="llama", size="tiny"))
    with LLMEngine(EngineConfig(model=str(tmp_path / "m"), kv_cache_bytes=4 << 20)) as engine:
        stage, kv = engine.runner.stage, engine.runner.kv
        blocks = kv.spec.num_blocks
        assert profile_forward(stage, kv) == min(4096, blocks * 16 // 512 * 512)
        small = LLMEngine(EngineConfig(model=str(tmp_path / "m"), num_kv_blocks=3))
        assert profile_forward(small.runner.stage, small.runner.kv) == 48  # what 3 blocks hold
        report = stage_report(stage, kv, share=8 << 20, weights=123)
        assert report["workspace_measured"] is None  # CPU: no allocator statistics
        assert report["kv"] == kv.spec.bytes_per_block * blocks
        assert report["workspace"] == workspace_bytes(
            parse_config(dict(LLAMA_SIZES["tiny"], model_type="llama")), 4)
