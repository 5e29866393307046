"""Checkpoints as transformers and the Hub ship them: shards written by ``save_pretrained``,
``dtype`` or ``torch_dtype`` in config.json, stop ids and sampling defaults in
generation_config.json."""

from __future__ import annotations

import json
import shutil

import pytest

from gpu_runtime.config import parse_config
from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.generate import generate
from gpu_runtime.generation_config import GenerationDefaults
from gpu_runtime.sampling import SamplingParams
from tests.gpu_runtime.conftest import PROMPTS, hf_greedy


def test_a_checkpoint_sharded_by_save_pretrained_matches_transformers(model_dirs, hf_models,
                                                                      tmp_path):
    hf = hf_models(model_dirs["llama-gqa"])
    out = tmp_path / "sharded"
    hf.save_pretrained(out, max_shard_size="100KB")
    shutil.copy(model_dirs["llama-gqa"] / "tokenizer.json", out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2, index["weight_map"]
    with LLMEngine(EngineConfig(model=str(out), dtype="float32", device="cpu")) as engine:
        tokens, logprobs = generate(engine, PROMPTS, SamplingParams(max_tokens=8,
                                                                    ignore_eos=True))
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logprobs = hf_greedy(hf, prompt, 8)
        assert tokens[i] == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs[i], ref_logprobs, strict=True)) < 1e-3


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_dtype_is_read_under_either_name(model_dirs, key):
    raw = json.loads((model_dirs["llama-gqa"] / "config.json").read_text())
    raw.pop("torch_dtype", None)
    raw.pop("dtype", None)
    assert parse_config(raw).torch_dtype == "float32"  # neither: float32
    assert parse_config(raw | {key: "bfloat16"}).torch_dtype == "bfloat16"


def test_generation_config_stop_ids_end_a_request(model_dirs, tmp_path):
    """An id listed only in generation_config.json stops generation, as Llama 3 Instruct's
    <|eot_id|> must."""
    d = tmp_path / "m"
    shutil.copytree(model_dirs["llama-gqa"], d)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    config = EngineConfig(model=str(d), dtype="float32", device="cpu")
    with LLMEngine(config) as engine:
        (free,), _ = generate(engine, PROMPTS[:1], params)
    stop_at = free[3]
    assert stop_at not in free[:3], free  # the fourth token is the first of its kind
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop_at]}))
    with LLMEngine(config) as engine:
        assert stop_at in engine.eos_token_ids and 2 in engine.eos_token_ids
        engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=10))
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
    assert [t for o in outs for t in o.new_token_ids] == free[:4]
    assert outs[-1].finish_reason == "stop"


@pytest.mark.parametrize("raw,eos,sampling", [
    ({"eos_token_id": 2}, (2,), {}),
    ({"eos_token_id": [128001, 128009], "do_sample": True, "temperature": 0.6, "top_p": 0.9},
     (128001, 128009), {"temperature": 0.6, "top_p": 0.9}),
    ({"temperature": 0.7, "top_k": 20}, (), {"temperature": 0.7, "top_k": 20}),
    ({"do_sample": False, "temperature": 0.6}, (), {}),  # authors ship greedy
    ({"temperature": 5.0, "top_p": 0.0, "top_k": True}, (), {}),  # outside what the API takes
    (None, (), {}),
])
def test_generation_defaults_from_the_file(raw, eos, sampling):
    gen = GenerationDefaults.from_dict(raw)
    assert (gen.eos_token_ids, gen.sampling_defaults()) == (eos, sampling)

