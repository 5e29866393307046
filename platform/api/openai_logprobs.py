"""OpenAI's two logprobs shapes, from what the worker records per output token (its id, its
logprob, the top ``[id, logprob]`` pairs, where its text starts): the chat one
(``choices[].logprobs.content[]`` with ``token``, ``logprob``, ``bytes``, ``top_logprobs``) and
the completions one (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).

A token's text is its bytes decoded, with a character that spans tokens written as ``\\xNN``
escapes (never U+FFFD); ``bytes`` are the exact bytes. A model without ``tokenizer.json``
names tokens ``token_id:N``, with no bytes."""

from __future__ import annotations

from dataclasses import dataclass

from gpu_runtime.detokenize import token_text
from gpu_runtime.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One choice's (or one stream event's) tokens and what the worker recorded of them."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list]  # per token: [[id, logprob], ...], most likely first
    text_offsets: list[int]  # per token: where its text starts in the choice's text

    @classmethod
    def of(cls, record: dict) -> TokenLogprobs:
        n = len(record.get("token_ids", []))
        return cls(record.get("token_ids", []), record.get("logprobs", []),
                   record.get("top_logprobs") or [[] for _ in range(n)],
                   record.get("text_offsets") or [0] * n)


def _token(tok: Tokenizer | None, token_id: int) -> tuple[str, list[int]]:
    if tok is None:
        return f"token_id:{token_id}", []
    raw = tok.token_bytes(token_id)
    return token_text(raw), list(raw)


def chat(tok: Tokenizer | None, t: TokenLogprobs) -> dict:
    """``{"content": [...]}`` of a chat choice or chunk."""
    content = []
    for token_id, logprob, top in zip(t.token_ids, t.logprobs, t.top_logprobs, strict=True):
        text, raw = _token(tok, token_id)
        alternatives = []
        for other_id, other_logprob in top:
            other_text, other_raw = _token(tok, other_id)
            alternatives.append({"token": other_text, "logprob": other_logprob,
                                 "bytes": other_raw})
        content.append({"token": text, "logprob": logprob, "bytes": raw,
                        "top_logprobs": alternatives})
    return {"content": content}


def completion(tok: Tokenizer | None, t: TokenLogprobs, text_start: int) -> dict:
    """The completions ``logprobs`` object; ``text_start``: characters before the output in
    the choice's text (the echoed prompt). Each ``top_logprobs`` entry holds the top tokens
    asked for and the chosen one."""
    tokens, tops = [], []
    for token_id, logprob, top in zip(t.token_ids, t.logprobs, t.top_logprobs, strict=True):
        text = _token(tok, token_id)[0]
        tokens.append(text)
        entry = {_token(tok, other)[0]: other_logprob for other, other_logprob in top}
        entry.setdefault(text, logprob)
        tops.append(entry)
    return {"tokens": tokens, "token_logprobs": t.logprobs, "top_logprobs": tops,
            "text_offset": [text_start + o for o in t.text_offsets]}
