"""Consolidation on the engine (real stage processes): a pipeline turns into the whole model on
stage 0 while it serves, with its in-flight KV migrated block by block, and every request's
greedy tokens and logprobs equal to the same requests on a pipeline that never consolidates."""

from __future__ import annotations

import math

import pytest

from gpu_runtime.consolidate import ConsolidationError, Consolidator, files_loader, whole_spec
from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.loader import plan_stages
from gpu_runtime.model_runner import LocalRunner
from gpu_runtime.sampling import SamplingParams
from tests.gpu_runtime.conftest import PROMPTS

LONG = SamplingParams(max_tokens=40, ignore_eos=True)
SHORT = SamplingParams(max_tokens=2, ignore_eos=True)
BLOCK = 4  # small blocks: several fill up during the test, so pre-copy has rounds to do


def spec_of(model_dir) -> object:
    config, specs, _ = plan_stages(model_dir, 1)
    s = specs[0]
    return whole_spec(s, s.tensor_names, config.num_layers, s.num_bytes)


def run(model_dir, pp: int, consolidate: bool, fill=None, chunk_blocks: int = 2) -> dict:
    """The same script of requests either way: ``early`` finishes before the switch, ``a``
    runs throughout, ``b`` joins while the rest loads, ``c`` joins at the switch."""
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", pp=pp,
                          num_threads=1, block_size=BLOCK, num_kv_blocks=96)
    got: dict[str, list] = {}
    with LLMEngine(config) as engine:
        engine.add_request("a", PROMPTS[0], LONG)
        engine.add_request("early", PROMPTS[1], SHORT)
        c = None
        for step in range(400):
            if step == 3:
                if consolidate:
                    c = Consolidator(engine, spec_of(model_dir), fill or files_loader(model_dir),
                                     chunk_blocks=chunk_blocks)
                    assert c.wait_loaded(120)
                engine.add_request("b", PROMPTS[2], LONG)
            if c is not None and not c.consolidated and not c.failed:
                about_to_switch = not c._pending(full_only=True)
                if about_to_switch and "c" not in got:
                    engine.add_request("c", PROMPTS[1], LONG)  # joins at the switch
                    got["c"] = [[], []]
                if c.tick():
                    c.release().join(30)
            for out in engine.step():
                toks, lps = got.setdefault(out.request_id, [[], []])
                toks += out.new_token_ids
                lps += out.new_logprobs
            if not engine.has_unfinished():
                break
        return {"outputs": got, "stats": c.stats if c else None, "engine": engine,
                "runner": type(engine.runner)}


def assert_same(got: dict, ref: dict) -> None:
    for rid in ("a", "b", "early"):
        assert got[rid][0] == ref[rid][0], (rid, got[rid][0], ref[rid][0])
        assert all(math.isclose(x, y, abs_tol=1e-3) for x, y in zip(got[rid][1], ref[rid][1],
                                                                   strict=True)), rid


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_consolidated_tokens_match_the_pipeline(pp, model_dirs):
    model_dir = model_dirs["llama-gqa"]
    ref = run(model_dir, pp, consolidate=False)["outputs"]
    result = run(model_dir, pp, consolidate=True)
    got, stats = result["outputs"], result["stats"]
    assert stats.state == "consolidated", stats
    assert result["runner"] is LocalRunner
    assert_same(got, ref)
    assert len(got["c"][0]) == LONG.max_tokens  # joined at the switch (checked below)
    # migration: full blocks before the switch, at most one block per sequence at it
    config, specs, _ = plan_stages(model_dir, pp)
    assert stats.migrated_layers == config.num_layers - len(specs[0].layers)
    assert stats.precopy_rounds >= 2 and stats.precopy_blocks > 0, stats
    assert stats.switch_blocks <= stats.switch_sequences, stats
    block_bytes = 2 * BLOCK * config.num_kv_heads * config.head_dim * 4
    assert stats.switch_bytes == stats.switch_blocks * block_bytes * stats.migrated_layers


def test_request_joining_at_the_switch_matches_a_standalone_model(model_dirs):
    model_dir = model_dirs["llama-gqa"]
    got = run(model_dir, 2, consolidate=True)["outputs"]
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu",
                          num_threads=1, block_size=BLOCK, num_kv_blocks=96)
    with LLMEngine(config) as engine:
        engine.add_request("c", PROMPTS[1], LONG)
        tokens = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
    assert got["c"][0] == tokens


def test_a_failed_load_leaves_the_pipeline_serving(model_dirs):
    model_dir = model_dirs["llama-gqa"]

    def broken(whole, have):
        raise OSError("the node cache lost the stage")

    ref = run(model_dir, 2, consolidate=False)["outputs"]
    result = run(model_dir, 2, consolidate=True, fill=broken)
    stats = result["stats"]
    assert stats.state == "failed" and "the node cache lost the stage" in stats.error, stats
    assert result["runner"].__name__ == "PipelineRunner"
    assert_same(result["outputs"], ref)


def test_consolidating_a_whole_model_is_refused(model_dirs):
    model_dir = model_dirs["llama-gqa"]
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", num_threads=1)
    with LLMEngine(config) as engine, pytest.raises(ConsolidationError, match="no pipeline"):
        Consolidator(engine, spec_of(model_dir), files_loader(model_dir))
