"""A stage's KV cache is what its share leaves after the weights and the workspace, never the
whole share; a toy model whose batch activations outweigh the share's reserve keeps the old
sizing (and says so)."""

from __future__ import annotations

from hydraserve.tasks.node.assignment import KV_FLOOR_BYTES, Assignment

MB = 2**20


def assignment(**kw) -> Assignment:
    base = dict(instance_id=1, plan_id=1, function_id=1, function_name="f",
                function_version_id=1, version=1, model_id=1, model_uri="file:///m",
                fingerprint="x", weight_files=("a",), dtype="bfloat16", pp=1, stage_index=0,
                addresses=(), group=(1,), memory_bytes=1250 * MB, model_bytes=1000 * MB,
                plan_time=0.0)
    return Assignment(**(base | kw))


def test_the_workspace_comes_out_of_the_kv_reserve():
    a = assignment(workspace_bytes=100 * MB)
    assert a.workspace_reserved and a.kv_cache_bytes == 150 * MB
    assert a.memory.to_dict() == {"share": 1250 * MB, "weights": 1000 * MB,
                                  "workspace": 100 * MB, "kv": 150 * MB}
    part = assignment(pp=2, stage_index=1, memory_bytes=625 * MB, workspace_bytes=50 * MB)
    assert part.kv_cache_bytes == 75 * MB  # 625 - 500 - 50


def test_a_toy_model_whose_workspace_outweighs_the_reserve_keeps_the_remainder():
    a = assignment(memory_bytes=10 * MB, model_bytes=8 * MB, workspace_bytes=46 * MB)
    assert not a.workspace_reserved and a.kv_cache_bytes == 2 * MB
    # SmolLM2-135M in float32 (make up): a 134 MB reserve, a 130 MB workspace; reserving it
    # would leave 4 MB of KV (80 tokens): the reserve stays the KV cache's
    smol = assignment(memory_bytes=672 * MB, model_bytes=538 * MB, workspace_bytes=130 * MB)
    assert not smol.workspace_reserved and smol.kv_cache_bytes == 134 * MB
    # reserved while it leaves at least half the reserve
    half = assignment(memory_bytes=1250 * MB, model_bytes=1000 * MB, workspace_bytes=125 * MB)
    assert half.workspace_reserved and half.kv_cache_bytes == 125 * MB
    tiny = assignment(memory_bytes=MB // 2, model_bytes=MB // 4, workspace_bytes=10 * MB)
    assert tiny.kv_cache_bytes == KV_FLOOR_BYTES
