"""``response_format``: a random-weight model sampling at temperature 1 still writes JSON that
parses and validates against the schema, for every seed; schemas llguidance cannot compile are
typed input errors; the bitmask sets exactly the disallowed logits to -inf."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.sampling import SamplingParams
from gpu_runtime.structured import StructuredOutputError, apply_token_bitmask, grammar_of

SEEDS = range(8)
PROMPT = [1, 5, 9]
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "owner": {"type": "object",
                  "properties": {"id": {"type": "integer"}, "active": {"type": "boolean"}},
                  "required": ["id", "active"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                 "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "owner", "tags"],
    "additionalProperties": False,
}
PET_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET,
                                                     "strict": True}}


@pytest.fixture(scope="module")
def engine(model_dirs):
    with LLMEngine(EngineConfig(model=str(model_dirs["llama-gqa"]), dtype="float32",
                                device="cpu")) as engine:
        yield engine


def generate(engine: LLMEngine, response_format: dict, max_tokens: int = 300,
             n: int = 1) -> dict[tuple[str, int], tuple[str, str | None]]:
    """(text, finish_reason) of every choice of one request per seed."""
    for seed in SEEDS:
        engine.add_request(str(seed), PROMPT, SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=seed), n=n,
            response_format=response_format)
    tokens: dict[tuple[str, int], list[int]] = {}
    reasons: dict[tuple[str, int], str | None] = {}
    while engine.has_unfinished():
        for out in engine.step():
            key = (out.request_id, out.index)
            tokens.setdefault(key, []).extend(out.new_token_ids)
            reasons[key] = out.finish_reason
    assert engine.tokenizer is not None
    return {k: (engine.tokenizer.decode(t), reasons[k]) for k, t in tokens.items()}


def test_json_schema_output_always_validates(engine):
    outputs = generate(engine, PET_FORMAT, n=2)
    assert len(outputs) == 2 * len(SEEDS)
    for key, (text, reason) in outputs.items():
        assert reason == "stop", (key, reason, text)
        doc = json.loads(text)
        jsonschema.validate(doc, PET)
        assert list(doc) == list(PET["properties"]), "properties follow the schema's order"
    assert len({text for text, _ in outputs.values()}) > 1, "every seed wrote the same JSON"


def test_json_object_output_is_an_object(engine):
    """A free-form object may run past any budget with a random model (a string that never
    closes): then it ends "length" with all its tokens; every other one parses."""
    outputs = generate(engine, {"type": "json_object"})
    stopped = [text for text, reason in outputs.values() if reason == "stop"]
    assert len(stopped) >= len(SEEDS) // 2, outputs
    for text in stopped:
        assert isinstance(json.loads(text), dict), text
    for text, reason in outputs.values():
        assert reason in ("stop", "length") and text.startswith("{"), (reason, text)


def test_max_tokens_cuts_a_document_short(engine):
    outputs = generate(engine, PET_FORMAT, max_tokens=5)
    for text, reason in outputs.values():
        assert reason == "length", (reason, text)
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_text_format_is_unconstrained(engine):
    engine.add_request("free", PROMPT, SamplingParams(max_tokens=4), response_format={
        "type": "text"})
    assert engine.scheduler.waiting[-1].matcher is None
    engine.abort("free")


@pytest.mark.parametrize("response_format,match", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "nonexistent"}}}}}, "nonexistent"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "#/definitions/missing"}}}, "missing"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "minProperties": 3, "maxProperties": 1}}}, "minProperties"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
    ({"type": "yaml"}, "'yaml'.*json_object"),
])
def test_unusable_formats_are_typed_errors(engine, response_format, match):
    with pytest.raises(StructuredOutputError, match=match) as err:
        engine.add_request("bad", PROMPT, SamplingParams(), response_format=response_format)
    assert err.value.param == "response_format" and err.value.status == 400
    assert not engine.has_unfinished()


def test_a_schema_compiles_once(engine):
    grammars = engine.grammars()
    grammar = grammar_of(PET_FORMAT)
    assert grammar is not None
    assert grammars.compile(grammar) is grammars.compile(grammar)


def test_pipeline_applies_the_mask_on_the_last_stage(model_dirs):
    with LLMEngine(EngineConfig(model=str(model_dirs["llama-gqa"]), dtype="float32",
                                device="cpu", pp=2, num_threads=1)) as engine:
        engine.add_request("p", PROMPT, SamplingParams(max_tokens=200, temperature=1.0,
                                                       seed=3), n=2, response_format=PET_FORMAT)
        tokens: dict[int, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.index, []).extend(out.new_token_ids)
        assert engine.tokenizer is not None
        for toks in tokens.values():
            jsonschema.validate(json.loads(engine.tokenizer.decode(toks)), PET)


def test_bitmask_sets_exactly_the_disallowed_logits():
    vocab = 70
    allowed = np.zeros((2, vocab), dtype=bool)
    allowed[0, [0, 31, 32, 69]] = True
    allowed[1, :] = True
    words = np.zeros((2, 3), dtype=np.uint32)
    for row, token in zip(*np.nonzero(allowed), strict=True):
        words[row, token // 32] |= np.uint32(1 << (token % 32))
    logits = torch.randn(2, vocab)
    expected = torch.where(torch.from_numpy(allowed), logits, float("-inf"))
    apply_token_bitmask(logits, torch.from_numpy(words.view(np.int32)))
    assert torch.equal(logits, expected)
