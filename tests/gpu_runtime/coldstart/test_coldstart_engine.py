"""An engine over a stage streamed from the prefetcher generates what the plain engine does."""

from __future__ import annotations

import pytest
import torch

from gpu_runtime.coldstart import plan_group, stream_stage
from gpu_runtime.coldstart.runtime import RuntimeInit, engine_for
from gpu_runtime.config import parse_config
from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.prefetch import open_buffer
from gpu_runtime.sampling import SamplingParams

PROMPTS = {"a": [1, 5, 9, 33, 7], "b": [2, 4, 8, 16, 32, 64, 128, 3], "c": [11]}


def run(engine: LLMEngine) -> dict[str, list[int]]:
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=10, ignore_eos=True))
    out: dict[str, list[int]] = {rid: [] for rid in PROMPTS}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return out


@pytest.mark.parametrize("model", ["llama", "opt"])
def test_greedy_tokens_equal_the_engine_loading_from_files(model, make_prefetcher, cs_server,
                                                           cs_index, cs_root):
    plan = plan_group(model, cs_index[model], 1, kv_cache_bytes=4 << 20)[0]
    pf = make_prefetcher()
    job = pf.prefetch(model, plan.cache_stage, plan.uri, plan.entries)
    config = parse_config(plan.config)
    init = RuntimeInit(plan, config, torch.bfloat16, torch.device("cpu"))
    init.start()  # KV cache and tokenizer while the weights stream in
    loaded = stream_stage(config, plan.spec, open_buffer(job.handle), job.layout, torch.bfloat16)
    parts = init.result(30)
    assert parts.tokenizer is not None and parts.channel is None
    assert parts.kv.spec.num_blocks == plan.engine.num_kv_blocks
    ours = run(engine_for(loaded.stage, parts, plan))
    plain = run(LLMEngine(EngineConfig(model=str(cs_root / model), kv_cache_bytes=4 << 20)))
    assert ours == plain
    assert all(len(t) == 10 for t in ours.values()) and len({tuple(t) for t in ours.values()}) > 1
