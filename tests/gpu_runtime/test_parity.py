"""Parity with transformers on small random models: identical greedy tokens, per-step logprobs
within 1e-3 in float32, for every architecture variant we claim (Qwen2, Qwen3 and Mistral also
over pipelines of 2, 3 and 4 stage processes), and close in bf16 and fp16 (bf16 over a pipeline
of 2 too).

Both sides run on ``HYDRA_TEST_DEVICE`` (cpu unless set; ``HYDRA_TEST_DEVICE=cuda`` runs the
same tests on a GPU, every stage process of a pipeline on that one device). Case ids end in
``-pp<K>``, so ``-k "not pp3 and not pp4"`` keeps pipelines of 1 and 2 stages.
"""

from __future__ import annotations

import pytest
import torch

from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.generate import generate
from gpu_runtime.sampling import SamplingParams
from tests.gpu_runtime.conftest import PROMPTS, WINDOW, eos_of, hf_greedy

NEW_TOKENS = 12
ATOL = 1e-3
# Llama-like architectures run on blocks of 4 tokens: a context of up to 23 tokens spans 6
# blocks, so a window of 5 starts mid-block and moves across block boundaries while decoding
LLAMA_LIKE = ("qwen2", "qwen2-window", "qwen3", "mistral")
SMALL_BLOCKS = 4
CASES = ([(v, 1) for v in ("llama-gqa", "llama-mha", "llama-tied", "llama-rope-linear",
                           "llama-rope-llama3", "opt", "opt-proj", "opt-untied", "llama-sharded")]
         + [(v, pp) for v in ("qwen2", "qwen3", "mistral") for pp in (1, 2, 3, 4)]
         + [("qwen2-window", 1), ("qwen2-window", 2)])  # pp 2: full and sliding stages
CASE_IDS = [f"{v}-pp{pp}" for v, pp in CASES]


def block_size(variant: str) -> int:
    return SMALL_BLOCKS if variant in LLAMA_LIKE else 16


def assert_parity(ours: tuple, ref: tuple, atol: float = ATOL) -> None:
    tokens, logprobs = ours
    ref_tokens, ref_logprobs = ref
    assert tokens == ref_tokens, f"tokens {tokens} != transformers {ref_tokens}"
    diff = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True))
    assert diff <= atol, f"logprob max diff {diff:.2e} > {atol} ({logprobs} vs {ref_logprobs})"


@pytest.mark.parametrize("variant,pp", CASES, ids=CASE_IDS)
def test_float32_batch_matches_transformers(variant, pp, model_dirs, hf_models,
                                            runtime_device):
    model_dir = model_dirs[variant]
    config = EngineConfig(model=str(model_dir), dtype="float32", device=runtime_device, pp=pp,
                          block_size=block_size(variant))
    with LLMEngine(config) as engine:
        tokens, logprobs = generate(engine, PROMPTS, SamplingParams(max_tokens=NEW_TOKENS))
    hf = hf_models(model_dir, device=runtime_device)
    for i, prompt in enumerate(PROMPTS):
        ref = hf_greedy(hf, prompt, NEW_TOKENS, eos_of(model_dir))
        assert_parity((tokens[i], logprobs[i]), ref)
    assert sum(map(len, tokens)) >= len(PROMPTS) * 4, f"EOS too early to test much: {tokens}"


def test_rope_scaling_changes_the_output(model_dirs, hf_models):
    """Guards the rope tests against a config both sides would ignore."""
    hf = hf_models(model_dirs["llama-rope-llama3"])
    assert hf.config.rope_parameters["rope_type"] == "llama3", hf.config.rope_parameters
    hf = hf_models(model_dirs["llama-rope-linear"])
    assert hf.config.rope_parameters["factor"] == 4.0, hf.config.rope_parameters


@pytest.mark.parametrize("variant,no_window", [
    ("mistral", {"sliding_window": None}),
    ("qwen2-window", {"layer_types": ["full_attention"] * 4})])
@torch.inference_mode()
def test_sliding_window_changes_the_output(variant, no_window, model_dirs, hf_models):
    """Guards the window tests: without its window the same checkpoint scores the first
    ``WINDOW`` prompt positions alike and every later one differently (the window acts in
    prefill, and spans its own position and the ones before), and after the 2-token prompt
    it generates other tokens (the window acts in decode alone). A runtime that ignored the
    window, or was off by one, would fail the parity tests."""
    from transformers import AutoModelForCausalLM

    model_dir = model_dirs[variant]
    windowed = hf_models(model_dir)
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                **no_window).eval()
    assert windowed.config.sliding_window == WINDOW, windowed.config
    assert len(PROMPTS[0]) > WINDOW > len(PROMPTS[1]), PROMPTS
    ids = torch.tensor([PROMPTS[0]])
    diff = (windowed(ids).logits[0].log_softmax(-1) - full(ids).logits[0].log_softmax(-1))
    diff = diff.abs().amax(-1)  # (prompt positions,)
    assert diff[:WINDOW].max() < ATOL and diff[WINDOW:].min() > 100 * ATOL, diff
    decode_windowed = hf_greedy(windowed, PROMPTS[1], NEW_TOKENS)[0]
    assert decode_windowed != hf_greedy(full, PROMPTS[1], NEW_TOKENS)[0], decode_windowed


@pytest.mark.parametrize("variant", ["llama-gqa", "mistral"])
def test_request_joins_while_others_decode(variant, model_dirs, hf_models, runtime_device):
    """Continuous batching: B and C join after A has decoded a few tokens, C is a different
    length; each request still equals its own transformers run (Mistral: with contexts both
    shorter and longer than its window in one decode batch)."""
    model_dir = model_dirs[variant]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    got: dict[str, list] = {"a": [[], []], "b": [[], []], "c": [[], []]}
    config = EngineConfig(model=str(model_dir), dtype="float32", device=runtime_device,
                          block_size=block_size(variant))
    with LLMEngine(config) as engine:
        engine.add_request("a", PROMPTS[0], params)
        batch_sizes = []
        for step in range(40):
            if step == 4:
                engine.add_request("b", PROMPTS[1], params)
            if step == 7:
                engine.add_request("c", PROMPTS[2], params)
            outs = engine.step()
            batch_sizes.append(len(outs))
            for out in outs:
                got[out.request_id][0] += out.new_token_ids
                got[out.request_id][1] += out.new_logprobs
        assert not engine.has_unfinished()
    assert 2 in batch_sizes and 3 in batch_sizes, f"requests never shared a step: {batch_sizes}"
    hf = hf_models(model_dir, device=runtime_device)
    for rid, prompt in zip("abc", PROMPTS, strict=True):
        ref = hf_greedy(hf, prompt, NEW_TOKENS)  # ignore_eos: no early stop on either side
        assert_parity(tuple(got[rid]), ref)


# Reduced precision: both sides round differently (op order, fused vs unfused, where the cast to
# float32 happens), so logprobs cannot match to 1e-3. We ask for identical greedy tokens on a
# short generation and logprobs within a tolerance a few bf16/fp16 ulps of a logprob of ~3:
# bf16 keeps 8 mantissa bits (relative 4e-3), fp16 11 bits (5e-4).
TOLERANCE = {torch.bfloat16: 0.1, torch.float16: 0.02}
HALF_CASES = ([(v, 1, dtype) for dtype in TOLERANCE
               for v in ("llama-gqa", "opt-proj", "qwen2", "qwen3", "mistral")]
              + [(v, 2, torch.bfloat16) for v in ("llama-gqa", "qwen3")])


@pytest.mark.parametrize("variant,pp,dtype", HALF_CASES, ids=[
    f"{v}-{str(dtype).removeprefix('torch.')}-pp{pp}" for v, pp, dtype in HALF_CASES])
def test_half_precision_tokens_agree(variant, pp, dtype, model_dirs, hf_models,
                                     runtime_device):
    model_dir = model_dirs[variant]
    name = str(dtype).removeprefix("torch.")
    config = EngineConfig(model=str(model_dir), dtype=name, device=runtime_device, pp=pp)
    with LLMEngine(config) as engine:
        assert engine.runner.stage.model.embed_tokens.weight.dtype == dtype
        tokens, logprobs = generate(engine, PROMPTS[:2], SamplingParams(max_tokens=6))
    hf = hf_models(model_dir, dtype, runtime_device)
    for i, prompt in enumerate(PROMPTS[:2]):
        assert_parity((tokens[i], logprobs[i]), hf_greedy(hf, prompt, 6, eos_of(model_dir)),
                      TOLERANCE[dtype])
