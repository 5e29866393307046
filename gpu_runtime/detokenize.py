"""Text of a sequence's output, grown token by token, that a client can trust: no U+FFFD of a
character split across tokens ever comes out, the first output token keeps its leading space
(SentencePiece drops it when a decode starts at that token), and the deltas add up to exactly
the text decoded at the end.

Each step decodes a short window (vLLM's detokenizer): the tokens from ``prefix_offset`` on,
minus the text of those before ``read_offset``; the window starts a few prompt tokens back, so
the first output token is decoded in context. A step whose text ends in U+FFFD (an incomplete
UTF-8 sequence) gives nothing until the next token completes it; ``finish`` gives what is left,
U+FFFD included when the model really produced invalid bytes.
"""

from __future__ import annotations

import re
from typing import Protocol

INCOMPLETE = "\ufffd"  # what decoding shows for a UTF-8 sequence cut between tokens
CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, for its first token's spacing
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tok: Decoder, prompt_ids: list[int]) -> None:
        self.tok = tok
        start, end = context_window(tok, prompt_ids)
        # prompt tokens past ``end`` begin a character the output completes: it is output
        self.ids = list(prompt_ids[start:])
        self.prefix_offset = 0
        self.read_offset = end - start
        self.text = ""  # the output text so far, every character complete
        self.offsets: list[int] = []  # per output token: len(text) before it was added

    def add(self, new_ids: list[int]) -> str:
        """Takes a step's new tokens; returns the text they complete (maybe "")."""
        delta = ""
        for token in new_ids:  # one at a time, so each token's offset is known
            self.offsets.append(len(self.text))
            self.ids.append(token)
            delta += self._advance(final=False)
        return delta

    def finish(self) -> str:
        """The text still held back at the end (an incomplete character the model left)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith(INCOMPLETE) and not final):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta


def before_stop(text: str, stops: tuple[str, ...]) -> str:
    """``text`` cut before the earliest stop string in it (the engine stops there); the text
    itself when none is in it."""
    hits = [text.find(s) for s in stops if s in text]
    return text[:min(hits)] if hits else text


def context_window(tok: Decoder, prompt_ids: list[int]) -> tuple[int, int]:
    """``prompt_ids[start:end]``: up to CONTEXT_TOKENS prompt tokens that decode to whole
    characters, ending as late as possible (at most 3 tokens before the prompt's end, the
    bytes of a character cut there). A window that starts inside a character starts later
    (byte fallback turns a whole run of bytes into U+FFFD when it starts with a stray one)."""
    n = len(prompt_ids)
    for end in range(n, max(n - 4, 0), -1):
        for start in range(max(end - CONTEXT_TOKENS, 0), end):
            if INCOMPLETE not in tok.decode(prompt_ids[start:end]):
                return start, end
    edge = max(n - 3, 0)  # no whole character near the end: no context, the tail pending
    return edge, edge


def decode_output(tok: Decoder, prompt_ids: list[int], output_ids: list[int]) -> str:
    """The whole output text at once, the way ``IncrementalDetokenizer`` builds it."""
    detok = IncrementalDetokenizer(tok, prompt_ids)
    detok.add(output_ids)
    detok.finish()
    return detok.text


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for bytes, reversed: printable Latin-1 bytes stand
    for themselves, the rest (controls, space, ...) for characters from U+0100 on, in byte
    order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


BYTE_DECODER = _byte_decoder()


def piece_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes of one vocabulary entry (``id_to_token``'s string)."""
    if byte_level and all(c in BYTE_DECODER for c in piece):
        return bytes(BYTE_DECODER[c] for c in piece)
    fallback = BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def token_text(raw: bytes) -> str:
    """A token's bytes as text for a client: an incomplete character is written as ``\\xNN``
    escapes, never as U+FFFD (the bytes themselves go out too)."""
    return raw.decode("utf-8", errors="backslashreplace")
