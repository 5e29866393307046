"""The OpenAI API as clients use it, through the official ``openai`` SDK against a whole local
cluster: model objects, logprobs in both shapes (streamed and not), ``stream_options``, echo,
stop strings across token boundaries, penalties and logit_bias (against the engine run here with
the same settings), messages with names, text parts and the developer role, and the fields
that are refused. One cluster, one function per model, started once for the module."""

from __future__ import annotations

import pytest

from gpu_runtime.detokenize import INCOMPLETE, decode_output
from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.sampling import SamplingParams
from gpu_runtime.tokenizer import Tokenizer
from tests.e2e.serving_cluster import Cluster, running_cluster

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def cluster(store_root, tmp_path_factory):
    with running_cluster(store_root, tmp_path_factory, "oai") as c:
        c.register("gpt", store_root / "llama-tiny")
        yield c


@pytest.fixture(scope="module")
def client(cluster: Cluster):
    import openai

    return openai.OpenAI(base_url=f"{cluster.base}/v1", api_key=cluster.settings.admin_key,
                         timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def tok(store_root) -> Tokenizer:
    return Tokenizer(store_root / "llama-tiny")


def engine_text(store_root, tok: Tokenizer, prompt_ids: list[int], **params) -> tuple[
        list[int], str]:
    """Tokens and text of the same model run here, one stage, no platform."""
    with LLMEngine(EngineConfig(model=str(store_root / "llama-tiny"))) as engine:
        engine.add_request("ref", prompt_ids, SamplingParams(**params))
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
    return tokens, decode_output(tok, prompt_ids, tokens)


def test_model_objects(client):
    import openai

    listed = {m.id: m for m in client.models.list()}
    assert listed["gpt"].max_model_len == 512
    one = client.models.retrieve("gpt")
    assert (one.id, one.object, one.max_model_len) == ("gpt", "model", 512)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("missing")


def test_chat_logprobs_streamed_and_not(client):
    kw = dict(model="gpt", messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
              top_logprobs=3)
    done = client.chat.completions.create(**kw)
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens
    text = done.choices[0].message.content
    if done.choices[0].finish_reason == "length" and INCOMPLETE not in text:  # whole bytes
        assert b"".join(bytes(c.bytes) for c in content) == text.encode()
    for c in content:
        assert len(c.top_logprobs) == 3 and c.logprob <= 0
        assert c.top_logprobs[0].token == c.token  # greedy: the most likely one
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert [t.logprob for t in c.top_logprobs] == sorted(
            [t.logprob for t in c.top_logprobs], reverse=True)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [c for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content],
                                                          abs=1e-4)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_completion_logprobs_echo_and_include_usage(client, tok):
    done = client.completions.create(model="gpt", prompt=PROMPT, max_tokens=6, temperature=0,
                                     logprobs=2)
    choice = done.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 6
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    if INCOMPLETE not in choice.text:  # tokens of whole characters add up to the text
        assert "".join(lp.tokens) == choice.text
    echoed = client.completions.create(model="gpt", prompt=PROMPT, max_tokens=6, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == PROMPT + choice.text
    ids = tok.encode(PROMPT)
    by_ids = client.completions.create(model="gpt", prompt=ids, max_tokens=6, temperature=0,
                                       echo=True)
    assert by_ids.choices[0].text == tok.decode(ids, skip_special_tokens=False) + choice.text

    chunks = list(client.completions.create(model="gpt", prompt=PROMPT, max_tokens=6,
                                            temperature=0, echo=True, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == PROMPT + choice.text
    plain = list(client.completions.create(model="gpt", prompt=PROMPT, max_tokens=6,
                                           temperature=0, stream=True))
    assert all(c.usage is None and c.choices for c in plain)  # no usage unless asked


def test_a_stop_string_across_two_tokens(client, store_root, tok):
    ids = tok.encode(PROMPT)
    tokens, text = engine_text(store_root, tok, ids, max_tokens=16, ignore_eos=True)
    # a boundary inside the text with a character on each side: the stop spans both tokens
    for k in range(1, len(tokens)):
        head = decode_output(tok, ids, tokens[:k])
        if 0 < len(head) < len(text) and text[:len(head)] == head:
            stop = text[len(head) - 1:len(head) + 1]
            break
    else:
        pytest.fail(f"no token boundary inside {text!r}")
    assert stop not in decode_output(tok, ids, tokens[:k])
    expected = text[:text.find(stop)]
    done = client.completions.create(model="gpt", prompt=ids, max_tokens=16, temperature=0,
                                     stop=[stop, "\x07never"])
    assert (done.choices[0].text, done.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.completions.create(model="gpt", prompt=ids, max_tokens=16,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_penalties_and_logit_bias_match_the_engine(client, store_root, tok):
    ids = tok.encode(PROMPT)
    # 48 tokens: the plain greedy output repeats tokens 373, 355 and 404 from token 44 on
    plain, _ = engine_text(store_root, tok, ids, max_tokens=48, ignore_eos=True)
    cases = [({"frequency_penalty": 2.0, "presence_penalty": 1.0}, {}),
             ({}, {"repetition_penalty": 1.9}),
             ({"logit_bias": {str(plain[0]): -100}}, {})]
    for sdk, extra in cases:
        params = {k: v for k, v in (sdk | extra).items() if k != "logit_bias"}
        bias = tuple((int(t), float(b)) for t, b in sdk.get("logit_bias", {}).items())
        tokens, text = engine_text(store_root, tok, ids, max_tokens=48, ignore_eos=True,
                                   logit_bias=bias, **params)
        assert tokens != plain, (sdk, extra)
        done = client.completions.create(model="gpt", prompt=ids, max_tokens=48,
                                         temperature=0, extra_body=extra or None, **sdk)
        if done.choices[0].finish_reason == "length":
            assert done.choices[0].text == text, (sdk, extra)
        else:  # the platform stops at EOS; the reference ran on: compare the common part
            assert text.startswith(done.choices[0].text), (sdk, extra)


def test_messages_with_names_text_parts_and_the_developer_role(client):
    def say(messages):
        return client.chat.completions.create(model="gpt", messages=messages, max_tokens=8,
                                              temperature=0).choices[0].message.content

    as_system = say([{"role": "system", "content": "Be brief."}, *CHAT])
    assert say([{"role": "developer", "content": "Be brief."}, *CHAT]) == as_system
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be"},
                                            {"type": "text", "text": "brief."}]}, *CHAT]
    assert say(parts) == say([{"role": "system", "content": "Be\nbrief."}, *CHAT])
    assert isinstance(say([{"role": "user", "name": "ann", "content": "hi"}]), str)


def test_what_would_change_the_result_is_refused(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="tools is not supported") as info:
        client.chat.completions.create(model="gpt", messages=CHAT, tools=[{
            "type": "function", "function": {"name": "f", "parameters": {}}}])
    assert info.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}])
    ok = client.chat.completions.create(model="gpt", messages=CHAT, max_tokens=2, user="u1",
                                        metadata={"k": "v"}, store=False,
                                        service_tier="auto")
    assert ok.choices[0].message.role == "assistant"
