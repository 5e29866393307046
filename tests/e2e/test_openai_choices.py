"""``n`` choices and ``response_format`` through the whole platform, driven by the ``openai``
SDK: completions and chat, streamed and not; each choice is what the engine gives alone with
that choice's seed, streams carry every choice's text once, usage counts every choice, and JSON
output validates against its schema."""

from __future__ import annotations

import json

import jsonschema
import pytest

from gpu_runtime.engine import EngineConfig, LLMEngine, choice_seed
from gpu_runtime.sampling import SamplingParams
from gpu_runtime.tokenizer import Tokenizer
from tests.e2e.serving_cluster import Cluster, running_cluster

PROMPT = [1, 5, 9, 13, 200, 31]
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
    with running_cluster(store_root, tmp_path_factory, "choices") as c:
        c.register("multi", store_root / "llama-tiny")
        yield c


@pytest.fixture(scope="module")
def client(cluster: Cluster):
    import openai

    return openai.OpenAI(base_url=f"{cluster.base}/v1", api_key=cluster.settings.admin_key,
                         max_retries=0, timeout=300)


def alone(model_dir, seed: int | None, max_tokens: int) -> str:
    """The text the engine writes for PROMPT with ``n = 1`` and ``seed``, in this process."""
    with LLMEngine(EngineConfig(model=str(model_dir))) as engine:
        engine.add_request("ref", PROMPT, SamplingParams(max_tokens=max_tokens, temperature=1.0,
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
    done = client.completions.create(model="multi", prompt=PROMPT, max_tokens=8, n=3,
                                     temperature=1.0, seed=SEED)
    assert [c.index for c in done.choices] == [0, 1, 2]
    expected = [alone(store_root / "llama-tiny", choice_seed(SEED, i), 8) for i in range(3)]
    assert [c.text for c in done.choices] == expected
    assert len(set(expected)) == 3, "three seeds wrote the same text"
    choices = stored_choices(cluster, done.id.removeprefix("cmpl-"))
    assert done.usage.completion_tokens == sum(len(c["token_ids"]) for c in choices)
    assert done.usage.prompt_tokens == len(PROMPT)


def test_streamed_completions_carry_every_choice_once(client):
    kwargs = {"model": "multi", "prompt": PROMPT, "max_tokens": 8, "n": 2, "temperature": 1.0,
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
