"""Penalties, logit_bias and top logprobs through the engine, on one stage and on the last stage
of a pipeline, against references computed from the transformers model: HF's
``RepetitionPenaltyLogitsProcessor`` for the repetition penalty, OpenAI's formula written out
for presence and frequency."""

from __future__ import annotations

import pytest
import torch

from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.sampling import SamplingParams
from tests.gpu_runtime.conftest import PROMPTS, hf_greedy

NEW_TOKENS = 20  # the unpenalised greedy output repeats token 511 at step 17


def run(model_dir, params: SamplingParams, pp: int = 1) -> tuple[list[int], list[list]]:
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", pp=pp,
                          num_threads=1)
    tokens: list[int] = []
    tops: list[list] = []
    with LLMEngine(config) as engine:
        engine.add_request("r", PROMPTS[0], params)
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
                tops += out.new_top_logprobs
    return tokens, tops


@torch.inference_mode()
def hf_processed_greedy(model, prompt: list[int], max_new_tokens: int, process) -> list[int]:
    """Greedy decoding with ``process(logits, prompt, output)`` applied before the argmax
    (whole forward each step: simple and exact)."""
    output: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([prompt + output])).logits[0, -1].float()
        output.append(int(process(logits, prompt, output).argmax()))
    return output


def hf_repetition(penalty: float):
    from transformers import RepetitionPenaltyLogitsProcessor

    proc = RepetitionPenaltyLogitsProcessor(penalty)
    return lambda logits, prompt, output: proc(torch.tensor([prompt + output]),
                                               logits[None].clone())[0]


def openai_penalties(presence: float, frequency: float):
    def process(logits, _prompt, output):
        out = logits.clone()
        for token in set(output):
            out[token] -= output.count(token) * frequency + presence
        return out
    return process


CASES = {
    "repetition": (SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True,
                                  repetition_penalty=1.8), hf_repetition(1.8)),
    "presence+frequency": (SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True,
                                          presence_penalty=1.5, frequency_penalty=1.0),
                           openai_penalties(1.5, 1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_with_a_penalty_matches_the_reference_and_changes_tokens(case, model_dirs,
                                                                          hf_models):
    model_dir = model_dirs["llama-gqa"]
    params, process = CASES[case]
    hf = hf_models(model_dir)
    plain, _ = hf_greedy(hf, PROMPTS[0], NEW_TOKENS)
    expected = hf_processed_greedy(hf, PROMPTS[0], NEW_TOKENS, process)
    assert expected != plain, "the penalty should change the greedy tokens of this model"
    got, _ = run(model_dir, params)
    assert got == expected


def test_penalties_bias_and_top_logprobs_on_the_last_stage_of_a_pipeline(model_dirs,
                                                                         hf_models):
    model_dir = model_dirs["llama-gqa"]
    hf = hf_models(model_dir)
    plain, _ = hf_greedy(hf, PROMPTS[0], NEW_TOKENS)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, repetition_penalty=1.8,
                            frequency_penalty=0.5, top_logprobs=3,
                            logit_bias=((plain[0], -100.0),))
    one, tops_one = run(model_dir, params)
    two, tops_two = run(model_dir, params, pp=2)
    assert one == two and one[0] != plain[0]  # the bias banned the first greedy token
    assert plain[0] not in one
    assert len(tops_two) == NEW_TOKENS and all(len(t) == 3 for t in tops_two)
    # raw logprobs: the first step's top tokens are the model's own, the banned one first
    with torch.inference_mode():
        raw = torch.log_softmax(hf(torch.tensor([PROMPTS[0]])).logits[0, -1].float(), -1)
    assert [t for t, _ in tops_two[0]] == raw.topk(3).indices.tolist()
    assert tops_two[0][0][0] == plain[0]
    for a, b in zip(tops_one, tops_two, strict=True):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=1e-4)


def test_a_logit_bias_outside_the_vocabulary_is_refused(model_dirs):
    from gpu_runtime.errors import TokenIdError

    with (LLMEngine(EngineConfig(model=str(model_dirs["opt"]), device="cpu")) as engine,
          pytest.raises(TokenIdError, match="logit_bias token id 999999") as info):
        engine.add_request("r", [1, 2], SamplingParams(logit_bias=((999999, 1.0),)))
    assert info.value.param == "logit_bias"
