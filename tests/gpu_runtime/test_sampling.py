"""Sampling parameters and the sampler."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_runtime.errors import SamplingParamsError
from gpu_runtime.sampling import SamplingBatch, SamplingParams, apply_penalties, sample


@pytest.mark.parametrize("kwargs,name,allowed", [
    ({"temperature": -0.1}, "temperature", "0.0..100.0"),
    ({"temperature": 101.0}, "temperature", "0.0..100.0"),
    ({"top_p": 0.0}, "top_p", "(0.0, 1.0]"),
    ({"top_p": 1.5}, "top_p", "(0.0, 1.0]"),
    ({"top_k": -1}, "top_k", ">= 0"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"seed": -5}, "seed", "0.."),
    ({"stop": ("",)}, "stop", "non-empty"),
    ({"top_logprobs": 21}, "top_logprobs", "0..20"),
    ({"presence_penalty": 2.5}, "presence_penalty", "-2.0..2.0"),
    ({"frequency_penalty": -3.0}, "frequency_penalty", "-2.0..2.0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
    ({"logit_bias": ((5, 101.0),)}, "logit_bias", "-100..100"),
    ({"logit_bias": ((-1, 1.0),)}, "logit_bias", "token id >= 0"),
])
def test_out_of_range_params_name_value_and_range(kwargs, name, allowed):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == name
    assert isinstance(info.value, ValueError)
    assert repr(next(iter(kwargs.values()))) in str(info.value) and allowed in str(info.value)


def batch(params: list[SamplingParams], steps: list[int] | None = None,
          histories: list[tuple[list[int], list[int]]] | None = None) -> SamplingBatch:
    return SamplingBatch.of(params, steps or [0] * len(params),
                            histories or [([], [])] * len(params))


def test_greedy_and_logprobs():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    tokens, logprobs, top = sample(logits, batch([SamplingParams()] * 2))
    assert top == [[], []]  # none asked for
    assert tokens == [1, 0]
    expected = 2.0 - math.log(math.exp(0) + math.exp(2) + math.exp(1))
    assert logprobs[0] == pytest.approx(expected, abs=1e-6)


def test_seeded_sampling_is_reproducible_and_row_independent():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=1.0, seed=1234)
    draws = [sample(logits, batch([p], [s]))[0][0] for s in range(20)]
    again = [sample(logits, batch([p], [s]))[0][0] for s in range(20)]
    assert draws == again
    assert len(set(draws)) > 3, f"temperature 1 over 50 tokens should vary: {draws}"
    # the same row inside a larger batch draws the same token
    other = SamplingParams(temperature=0.7, seed=99)
    mixed = sample(torch.cat([torch.randn(1, 50), logits]), batch([other, p], [0, 5]))[0]
    assert mixed[1] == draws[5]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0]])
    k2 = SamplingParams(temperature=5.0, top_k=2)
    seen = {sample(logits, batch([k2]))[0][0] for _ in range(200)}
    assert seen == {0, 1}, seen
    # softmax mass: ~0.665, 0.245, 0.090, ...: top_p 0.8 keeps tokens 0 and 1
    p8 = SamplingParams(temperature=1.0, top_p=0.8)
    seen = {sample(logits, batch([p8]))[0][0] for _ in range(300)}
    assert seen == {0, 1}, seen


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    p = SamplingParams(temperature=1.0)
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[sample(logits, batch([p]))[0][0]] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.04), freq


def test_top_logprobs_are_the_raw_log_softmax_most_likely_first():
    torch.manual_seed(3)
    logits = torch.randn(3, 40)
    params = [SamplingParams(top_logprobs=5), SamplingParams(),
              SamplingParams(temperature=0.5, top_p=0.5, top_logprobs=2, seed=1)]
    tokens, logprobs, top = sample(logits, batch(params))
    raw = torch.log_softmax(logits, dim=-1)
    assert [len(t) for t in top] == [5, 0, 2]
    for row in (0, 2):
        ids = [t for t, _ in top[row]]
        assert ids == raw[row].topk(len(ids)).indices.tolist()
        # before temperature and top-p: the same distribution the chosen logprob comes from
        assert [v for _, v in top[row]] == pytest.approx(raw[row, ids].tolist(), abs=1e-5)
        assert logprobs[row] == pytest.approx(raw[row, tokens[row]].item(), abs=1e-5)
    assert top[0][0][0] == tokens[0]  # greedy picks the most likely


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(4)
    logits = torch.randn(2, 30) * 3
    histories = [([1, 2, 3, 7], [7, 9]), ([4], [])]
    params = [SamplingParams(repetition_penalty=1.7), SamplingParams(repetition_penalty=0.6)]
    out = apply_penalties(logits, batch(params, [2, 0], histories))
    for row, (prompt, output) in enumerate(histories):
        hf = RepetitionPenaltyLogitsProcessor(params[row].repetition_penalty)
        want = hf(torch.tensor([prompt + output]), logits[row:row + 1].clone())
        assert torch.allclose(out[row], want[0]), row
    assert not torch.equal(out, logits)


def openai_penalties(logits: torch.Tensor, output: list[int], presence: float,
                     frequency: float) -> torch.Tensor:
    """OpenAI's documented formula, written out token by token."""
    want = logits.clone()
    for token in set(output):
        count = output.count(token)
        want[token] -= count * frequency + presence
    return want


@pytest.mark.parametrize("presence,frequency", [(0.8, 0.0), (0.0, 1.5), (-1.0, 0.5)])
def test_presence_and_frequency_penalties_follow_openai(presence, frequency):
    torch.manual_seed(5)
    logits = torch.randn(1, 25)
    prompt, output = [3, 4, 5], [5, 6, 6, 6, 9]
    p = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
    out = apply_penalties(logits, batch([p], [len(output)], [(prompt, output)]))
    want = openai_penalties(logits[0], output, presence, frequency)
    assert torch.allclose(out[0], want, atol=1e-6)
    assert out[0, 3] == logits[0, 3]  # prompt tokens are not counted


def test_logit_bias_bans_and_forces_tokens_greedy_and_sampled():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]])
    banned = SamplingParams(logit_bias=((0, -100.0),))
    assert sample(logits, batch([banned]))[0] == [1]
    forced = SamplingParams(temperature=1.0, logit_bias=((3, 100.0),), seed=7)
    assert {sample(logits, batch([forced], [s]))[0][0] for s in range(20)} == {3}
    # logprobs stay those of the raw logits
    _, logprobs, _ = sample(logits, batch([banned]))
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item(), abs=1e-6)


def test_greedy_with_a_penalty_changes_the_token():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    history = [([0], [0])]
    assert sample(logits, batch([SamplingParams()], [1], history))[0] == [0]
    penalised = SamplingParams(frequency_penalty=0.5)
    assert sample(logits, batch([penalised], [1], history))[0] == [1]


def test_the_batch_round_trips_through_the_channel_meta():
    import json

    params = [SamplingParams(top_logprobs=3, presence_penalty=0.5, logit_bias=((2, 1.5),)),
              SamplingParams(temperature=0.7, seed=4)]
    b = batch(params, [3, 0], [([1, 2], [3, 4, 4]), ([9], [])])
    again = SamplingBatch.from_meta(json.loads(json.dumps(b.to_meta())))
    assert again == b
    assert again.prompt_ids == [[1, 2], []]  # a row without penalties carries no history
    assert again.output_ids == [[3, 4, 4], []]
    plain = batch([SamplingParams()] * 2)
    assert (plain.prompt_ids, plain.logit_biases, plain.top_logprobs) == ([], [], [])
