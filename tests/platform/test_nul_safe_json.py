"""The jsonb escaping of generated text: any JSON value survives the round trip, and what is
stored never holds U+0000 (which Postgres jsonb refuses)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hydraserve.db import ESCAPE, escape_nul, unescape_nul

# strings rich in the two characters that matter
texts = st.text(alphabet=st.sampled_from(["a", "0", "\x00", ESCAPE, "é", "\n"]), max_size=12) | st.text()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                   max_size=4),
    max_leaves=12)


def holds_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(v) for v in value.values())
    if isinstance(value, list):
        return any(holds_nul(v) for v in value)
    return False


@given(json_values)
def test_round_trip_and_no_nul_stored(value):
    stored = escape_nul(value)
    assert not holds_nul(stored)
    assert unescape_nul(stored) == value


def test_plain_text_is_stored_as_it_is():
    value = {"text": "hello, world", "token_ids": [1, 2], "finish_reason": "stop"}
    assert escape_nul(value) == value
    assert escape_nul("a\x00b") == ESCAPE + "a" + ESCAPE + "0b"

