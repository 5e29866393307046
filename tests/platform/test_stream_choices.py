"""No token twice, per choice: a request with ``n`` choices streams each choice's tokens with
its ``choice`` index, and a retry replaying every choice from token 0 is deduplicated choice by
choice (positions are per choice)."""

from __future__ import annotations

from tests.platform.test_stream_resume import follow


def tok(choice: int, index: int, ids: list[int], text: str, text_offset: int) -> dict:
    return {"type": "token", "choice": choice, "token_ids": ids, "text": text,
            "index": index, "text_offset": text_offset}


def test_each_choice_has_its_own_cursor_across_a_retry():
    got, waiter = follow([
        tok(0, 0, [1], "a", 0), tok(1, 0, [7], "x", 0),  # same positions, other choices
        tok(0, 1, [2], "b", 1),  # attempt 1 dies here; the retry starts both from token 0
        tok(0, 0, [1], "a", 0), tok(1, 0, [7], "x", 0), tok(1, 1, [8], "y", 1),
        tok(0, 1, [2], "b", 1), tok(0, 2, [3], "c", 2),
        {"type": "done"}])
    streamed: dict[int, str] = {}
    for e in got:
        if e["type"] == "token":
            streamed[e["choice"]] = streamed.get(e["choice"], "") + e["text"]
    assert streamed == {0: "abc", 1: "xy"}
    assert (waiter.cursor(0).token_ids, waiter.cursor(1).token_ids) == ([1, 2, 3], [7, 8])
    assert got[-1]["type"] == "done" and waiter.diverged is None


def test_a_retry_that_differs_in_one_choice_ends_the_stream():
    got, waiter = follow([tok(0, 0, [1], "a", 0), tok(1, 0, [7], "x", 0),
                          tok(1, 0, [9], "z", 0), {"type": "done"}])
    assert [e["type"] for e in got] == ["token", "token", "error"]
    assert waiter.diverged and "other tokens" in waiter.diverged


def test_events_without_a_choice_are_choice_zero():
    got, waiter = follow([{"type": "token", "token_ids": [4], "text": "q", "index": 0,
                           "text_offset": 0}, {"type": "done"}])
    assert waiter.cursor(0).text == "q" and list(waiter.cursors) == [0]
