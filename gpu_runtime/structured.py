"""Structured output: OpenAI's ``response_format`` (``json_object``, ``json_schema``) enforced
while decoding, with llguidance.

Why llguidance: it installs from one wheel with no dependency (no torch: the pinned CPU build
stays as it is; xgrammar needs torch), it takes the checkpoint's ``tokenizer.json`` text as it
is, it compiles JSON schemas lazily (a schema costs milliseconds, not a vocabulary-wide automaton
built up front as outlines-core does) and it computes a token bitmask per step in native code.

How it runs: the schema becomes a grammar once per distinct schema text (``Grammars`` caches the
compiled matcher and hands each sequence a copy, ``TokenMatcher``). Stage 0, which owns the
sequences, asks each constrained sequence's matcher for its allowed tokens before a step
(``step_bitmask``: one bit per token, the form llguidance writes); the bitmask travels with the
step and the last stage, which holds the logits, sets every disallowed token to -inf before
sampling (``apply_token_bitmask``). The sampled token then advances the matcher. EOS is in the
mask only when the grammar accepts what was generated, and a sequence whose grammar is complete
stops at once ("stop"). ``max_tokens`` can still cut a document short: it finishes "length" and
its text is not valid JSON. Log-probabilities are those of the masked distribution.

JSON is generated with fixed separators (``", "``, ``": "``) and no other whitespace: a model
left free to add whitespace can spend its whole budget on it (random and small models do).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import llguidance
import numpy as np
import torch

from gpu_runtime.errors import RuntimeInputError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

    from gpu_runtime.sequence import Sequence

FORMAT_TYPES = ("text", "json_object", "json_schema")
MAX_SCHEMA_CHARS = 100_000
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ",
                                    "key_separator": ": "}


class StructuredOutputError(RuntimeInputError):
    """A ``response_format`` that is malformed or whose schema cannot be compiled."""

    default_param = "response_format"


def grammar_of(response_format: dict | None) -> str | None:
    """The llguidance grammar of an OpenAI ``response_format``; None when output is free text.
    Raises StructuredOutputError for a malformed one (compilation is checked by ``Grammars``)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in FORMAT_TYPES:
        raise StructuredOutputError(f"response_format type {kind!r} is not supported; allowed "
                                    f"{', '.join(FORMAT_TYPES)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return _from_schema({"type": "object"})
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise StructuredOutputError("response_format json_schema needs {\"json_schema\": "
                                    "{\"name\": ..., \"schema\": {a JSON schema object}}}")
    return _from_schema(schema)


def _from_schema(schema: dict) -> str:
    text = json.dumps(schema)  # key order kept: properties are generated in schema order
    if len(text) > MAX_SCHEMA_CHARS:
        raise StructuredOutputError(f"the JSON schema has {len(text)} characters; allowed at "
                                    f"most {MAX_SCHEMA_CHARS}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise StructuredOutputError(f"the JSON schema cannot be used: {str(exc)[:300]}") from None


class Grammars:
    """Compiles grammars against one model's vocabulary; each distinct grammar once (LRU)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...],
                 capacity: int = 64) -> None:
        assert eos_token_ids, "a grammar needs an EOS token to end on"
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.capacity = capacity
        try:
            self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                     eos_token=list(eos_token_ids))
        except (ValueError, RuntimeError) as exc:  # a tokenizer.json llguidance cannot read
            raise StructuredOutputError(f"this model's tokenizer cannot drive response_format: "
                                        f"{str(exc)[:300]}") from None
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # the API checks schemas from several threads

    def compile(self, grammar: str) -> llguidance.LLMatcher:
        """A matcher in its initial state for ``grammar``, compiled on first use; raises
        StructuredOutputError when llguidance cannot compile it."""
        with self._lock:
            if grammar in self._cache:
                self._cache.move_to_end(grammar)
                return self._cache[grammar]
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"the JSON schema cannot be compiled: "
                                        f"{matcher.get_error()[:300]}")
        with self._lock:
            self._cache[grammar] = matcher
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return matcher

    def check(self, response_format: dict | None) -> None:
        """Raises StructuredOutputError unless ``response_format`` can be enforced."""
        grammar = grammar_of(response_format)
        if grammar is not None:
            self.compile(grammar)

    def matcher(self, grammar: str) -> TokenMatcher:
        """A matcher for one sequence, in the grammar's initial state."""
        return TokenMatcher(self.compile(grammar).deep_copy(), self.eos_token_ids)


class TokenMatcher:
    """The grammar state of one sequence."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: tuple[int, ...]) -> None:
        self._matcher = matcher
        self._eos = eos_token_ids

    def fill_bitmask(self, row: np.ndarray) -> None:
        """Writes the allowed next tokens into ``row`` (int32 words, bit set = allowed). A
        matcher in an error state allows EOS only, so the sequence ends instead of the batch
        sampling from an all -inf row."""
        if self._matcher.is_error():
            words = row.view(np.uint32)
            words[:] = 0
            for eos in self._eos:
                words[eos // 32] |= np.uint32(1 << (eos % 32))
            return
        row[:] = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.int32)[:len(row)]

    def accept(self, token: int) -> bool:
        """Advances past a sampled token; False when the grammar refused it."""
        if token in self._eos:
            return self._matcher.is_accepting()
        return self._matcher.consume_token(token)

    @property
    def is_stopped(self) -> bool:
        """The document is complete: nothing but EOS may follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def step_bitmask(rows: list[Sequence], vocab_size: int) -> torch.Tensor | None:
    """(rows, words) int32 bitmask of the next token of each sampled row: its matcher's allowed
    tokens, every token for a row without one; None when no row is constrained."""
    if all(seq.matcher is None for seq in rows):
        return None
    mask = np.full((len(rows), bitmask_words(vocab_size)), -1, dtype=np.int32)
    for i, seq in enumerate(rows):
        if seq.matcher is not None:
            seq.matcher.fill_bitmask(mask[i])
    return torch.from_numpy(mask)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Sets the logits of disallowed tokens to -inf, in place. logits: (rows, vocab) float;
    bitmask: (rows, words) int32, token t allowed when bit t % 32 of word t // 32 is set."""
    rows, vocab = logits.shape
    assert bitmask.shape[0] == rows and bitmask.shape[1] * 32 >= vocab, (
        f"bitmask {tuple(bitmask.shape)} does not cover logits {tuple(logits.shape)}")
    bitmask = bitmask.to(logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # (rows, words, 32)
    allowed = bits.flatten(1)[:, :vocab].bool()  # (rows, vocab)
    logits.masked_fill_(~allowed, float("-inf"))
