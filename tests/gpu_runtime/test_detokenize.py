"""Incremental detokenization with real ``tokenizers`` tokenizers built here: a byte-level BPE
(GPT-2 / Llama-3 style) and a SentencePiece-style BPE with byte fallback and the leading "▁"
(Llama-2 style). Characters of several bytes are split across tokens; streamed deltas never
hold U+FFFD and add up to the text decoded at once, spaces included."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from gpu_runtime.detokenize import (
    INCOMPLETE,
    IncrementalDetokenizer,
    decode_output,
    piece_bytes,
    token_text,
)

CORPUS = ["Hello world, how are you today?", "The quick brown fox jumps over the lazy dog.",
          "def add(a, b): return a + b", "numbers 0 1 2 3 42 100", "hello hello world"] * 20
TEXTS = ["Hello wörld, ça va? 😀 ok", "日本語のテキスト and more", "  two  spaces\tand tab → ",
         "emoji 👩‍👩‍👧 family é", "a😀b😀c"]


def byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def sentencepiece_like() -> Tokenizer:
    """Llama-2's layout: "▁" for spaces (one prepended), byte-fallback tokens for what the
    vocabulary lacks, a decoder that turns "▁" back into spaces and strips the first one."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    trained.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200,
                                                            show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0} | {f"<0x{b:02X}>": 1 + b for b in range(256)}
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                               unk_token="<unk>"))
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


TOKENIZERS = {"byte-level": byte_level(), "sentencepiece": sentencepiece_like()}


def stream(tok, prompt_ids: list[int], output_ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.add([t]) for t in output_ids] + [detok.finish()]
    return deltas, detok.text


@pytest.mark.parametrize("kind", list(TOKENIZERS))
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_hold_no_split_character_and_keep_the_spaces(kind, text):
    tok = TOKENIZERS[kind]
    ids = tok.encode(text).ids
    whole = tok.decode(ids)
    assert whole == text  # both round-trip these texts
    split = [i for i, t in enumerate(ids) if INCOMPLETE in tok.decode([t])]
    assert split, f"{kind}: some character of {text!r} should span tokens"
    for k in range(1, len(ids)):
        prompt, output = ids[:k], ids[k:]
        deltas, final = stream(tok, prompt, output)
        assert not any(INCOMPLETE in d for d in deltas), (kind, text, k, deltas)
        # the output is the text after the prompt's, its leading space included (and a
        # character the prompt starts and the output completes)
        complete = max(j for j in range(k + 1) if INCOMPLETE not in tok.decode(ids[:j]))
        prompt_text = tok.decode(ids[:complete])
        assert final == "".join(deltas) == whole[len(prompt_text):], (kind, k)


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_random_tokens_stream_what_one_decode_gives(kind):
    tok = TOKENIZERS[kind]
    rng = random.Random(7)
    size = tok.get_vocab_size()
    for _ in range(200):
        prompt = [rng.randrange(size) for _ in range(rng.randrange(1, 8))]
        output = [rng.randrange(size) for _ in range(rng.randrange(1, 30))]
        deltas, final = stream(tok, prompt, output)
        assert "".join(deltas) == final == decode_output(tok, prompt, output)
        for d in deltas[:-1]:
            assert not d.endswith(INCOMPLETE), (prompt, output, deltas)


def test_the_first_output_token_keeps_its_space_with_sentencepiece():
    tok = TOKENIZERS["sentencepiece"]
    ids = tok.encode("Hello world").ids
    assert tok.decode(ids[1:]) == "world"  # a decode from that token drops the space
    assert decode_output(tok, ids[:1], ids[1:]) == " world"


def test_offsets_say_where_each_token_starts():
    tok = TOKENIZERS["byte-level"]
    ids = tok.encode("a😀b").ids
    detok = IncrementalDetokenizer(tok, [])
    detok.add(ids)
    assert detok.text == "a😀b"
    # the emoji's bytes span tokens: each of them starts where the emoji does
    starts = [detok.offsets[i] for i in range(len(ids))]
    assert starts[0] == 0 and starts[-1] == 2 and set(starts[1:-1]) == {1}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_token_bytes_add_up_to_the_text(kind):
    tok = TOKENIZERS[kind]
    byte_level = kind == "byte-level"
    text = "Hello wörld 😀"
    ids = tok.encode(text).ids
    raw = b"".join(piece_bytes(tok.id_to_token(t), byte_level) for t in ids)
    assert raw.decode("utf-8").lstrip(" ") == text  # SentencePiece: the one prepended space
    partial = [t for t in ids if INCOMPLETE in tok.decode([t])]
    texts = [token_text(piece_bytes(tok.id_to_token(t), byte_level)) for t in partial]
    assert texts and all("\\x" in t and INCOMPLETE not in t for t in texts), texts
