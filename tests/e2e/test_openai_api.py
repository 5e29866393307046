"""The OpenAI API as clients use it, through the official ``openai`` SDK against a whole local
cluster: model objects, logprobs in both shapes (streamed and not), ``stream_options``, echo,
stop strings across token boundaries, penalties and logit_bias (against the engine run here with
the same settings), messages with names, text parts and the developer role, and the fields
that are refused; ``n`` choices (each what the engine gives alone with that choice's seed,
streams carrying every choice's text once, usage counting every choice) and ``response_format``
(JSON output validates against its schema). One cluster, started once for the module."""

from __future__ import annotations

import json

import jsonschema
import pytest

from gpu_runtime.detokenize import INCOMPLETE, decode_output
from gpu_runtime.engine import EngineConfig, LLMEngine, choice_seed
from gpu_runtime.sampling import SamplingParams
from gpu_runtime.tokenizer import Tokenizer
from tests.e2e.serving_cluster import Cluster, running_cluster

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Hello, how are you?"}]
PROMPT_IDS = [1, 5, 9, 13, 200, 31]
SEED = 7
SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 10},
                         "size": {"enum": ["small", "large"]},
                         "population": {"type": "integer", "minimum": 0},
                         "districts": {"type": "array", "items": {"type": "integer"},
                                       "maxItems": 3}},
          "required": ["city", "size", "population", "districts"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def cluster(store_root, tmp_path_factory):
    with running_cluster(store_root, tmp_path_factory, "oai") as c:
        c.register("gpt", store_root / "llama-tiny")
        c.register("multi", store_root / "llama-tiny")
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
    short = client.chat.completions.create(model="gpt", messages=CHAT, temperature=0,
                                           max_completion_tokens=3, max_tokens=50)
    assert short.usage.completion_tokens <= 3  # the newer field wins over max_tokens
    assert short.choices[0].finish_reason == "length" or short.usage.completion_tokens < 3


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


# ---- n choices and response_format ---------------------------------------------------------

def alone(model_dir, seed: int | None, max_tokens: int) -> str:
    """The text the engine writes for PROMPT_IDS with ``n = 1`` and ``seed``, in this process."""
    with LLMEngine(EngineConfig(model=str(model_dir))) as engine:
        engine.add_request("ref", PROMPT_IDS, SamplingParams(max_tokens=max_tokens, temperature=1.0,
                                                         seed=seed))
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
    return Tokenizer(model_dir).decode(tokens)


def stored_choices(cluster: Cluster, inv_suffix: str) -> list[dict]:
    (output,) = cluster.query("SELECT output FROM invocations WHERE id = :i",
                              i="inv_" + inv_suffix)[0]
    return output["choices"]


def test_completions_give_n_choices_each_as_its_seed_alone(cluster, client, store_root):
    done = client.completions.create(model="multi", prompt=PROMPT_IDS, max_tokens=8, n=3,
                                     temperature=1.0, seed=SEED)
    assert [c.index for c in done.choices] == [0, 1, 2]
    expected = [alone(store_root / "llama-tiny", choice_seed(SEED, i), 8) for i in range(3)]
    assert [c.text for c in done.choices] == expected
    assert len(set(expected)) == 3, "three seeds wrote the same text"
    choices = stored_choices(cluster, done.id.removeprefix("cmpl-"))
    assert done.usage.completion_tokens == sum(len(c["token_ids"]) for c in choices)
    assert done.usage.prompt_tokens == len(PROMPT_IDS)


def test_streamed_completions_carry_every_choice_once(client):
    kwargs = {"model": "multi", "prompt": PROMPT_IDS, "max_tokens": 8, "n": 2, "temperature": 1.0,
              "seed": SEED + 1}
    whole = client.completions.create(**kwargs)
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        assert len(chunk.choices) == 1, chunk  # one choice per chunk, named by its index
        c = chunk.choices[0]
        texts[c.index] = texts.get(c.index, "") + c.text
        if c.finish_reason:
            reasons[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}


def test_chat_choices_streamed_and_not(cluster, client):
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model="multi", messages=messages, max_tokens=6,
                                           n=2, temperature=1.0, seed=SEED)
    assert [c.index for c in whole.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in whole.choices)
    stream = client.chat.completions.create(model="multi", messages=messages, max_tokens=6,
                                            n=3, temperature=1.0, seed=SEED, stream=True,
                                            stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    roles: dict[int, str] = {}
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk
    for chunk in chunks[:-1]:
        assert len(chunk.choices) == 1, chunk
        c = chunk.choices[0]
        if c.delta.role:
            roles[c.index] = c.delta.role
        texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}  # once per choice
    # the same request and seed: choices 0 and 1 of n=3 are those of n=2
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    choices = stored_choices(cluster, chunks[0].id.removeprefix("chatcmpl-"))
    assert [c["text"] for c in choices] == [texts[0], texts[1], texts[2]]
    assert chunks[-1].usage.completion_tokens == sum(len(c["token_ids"]) for c in choices)


def test_json_schema_output_validates(client):
    import openai

    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA,
                                                  "strict": True}}
    done = client.chat.completions.create(
        model="multi", messages=[{"role": "user", "content": "A city, as JSON."}],
        max_tokens=200, n=2, temperature=1.0, seed=SEED, response_format=fmt)
    for c in done.choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {
        "type": "object", "properties": {"a": {"type": "nonexistent"}}}}}
    with pytest.raises(openai.BadRequestError, match="nonexistent") as err:
        client.chat.completions.create(model="multi", messages=[{"role": "user",
                                                                 "content": "x"}],
                                       response_format=bad)
    assert err.value.body["param"] == "response_format"
