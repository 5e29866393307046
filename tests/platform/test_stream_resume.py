"""No token twice: a retried attempt replays from token 0, and the client's stream skips what it
has been sent (or ends with an error when the replay differs); stop strings are held back."""

from __future__ import annotations

import queue

import pytest

from hydraserve.invocations.replies import ReplayDiverged, StreamCursor, Waiter
from hydraserve.tasks.node.request_loop import held_back


def tok(index: int, ids: list[int], text_offset: int, text: str, **extra) -> dict:
    return {"type": "token", "token_ids": ids, "text": text, "index": index,
            "text_offset": text_offset} | extra


def test_a_replay_sends_only_what_lies_past_the_cursor():
    c = StreamCursor()
    assert c.advance(tok(0, [1, 2], 0, "ab"))["token_ids"] == [1, 2]
    assert c.advance(tok(2, [3], 2, "c"))["text"] == "c"
    assert c.advance(tok(0, [1, 2], 0, "ab")) is None  # the retry, from token 0
    out = c.advance(tok(2, [3, 4], 2, "cd", logprobs=[-0.1, -0.2]))  # overlaps by one token
    assert (out["token_ids"], out["text"], out["logprobs"]) == ([4], "d", [-0.2])
    assert (out["index"], out["text_offset"]) == (3, 3)  # where the client is, not the retry
    assert (c.token_ids, c.text) == ([1, 2, 3, 4], "abcd")


def test_a_replay_that_differs_raises():
    c = StreamCursor()
    c.advance(tok(0, [1, 2], 0, "ab"))
    with pytest.raises(ReplayDiverged, match="other tokens"):
        c.advance(tok(0, [1, 9], 0, "ax"))
    with pytest.raises(ReplayDiverged, match="skip from 2 to 5"):
        c.advance(tok(5, [7], 5, "z"))


def test_events_without_a_position_pass_as_they_are():
    c = StreamCursor()
    assert c.advance({"type": "token", "token_ids": [5], "text": "x"})["text"] == "x"
    assert c.text == "x"


class Listener:
    def unsubscribe(self, _inv_id: str) -> None:
        pass


def follow(events: list[dict]) -> tuple[list[dict], Waiter]:
    q: queue.Queue = queue.Queue()
    for e in events:
        q.put(e)
    waiter = Waiter(lambda: None, Listener(), "inv_x", q)  # sessions unused: events end it
    return [e for e in waiter.follow(5.0) if e is not None], waiter


def test_the_waiter_streams_each_token_once_across_a_retry():
    got, waiter = follow([tok(0, [1], 0, "a"), tok(1, [2], 1, "b"),  # attempt 1 dies here
                          tok(0, [1], 0, "a"), tok(1, [2], 1, "b"), tok(2, [3], 2, "c"),
                          {"type": "done", "text": "abc"}])
    assert [e["text"] for e in got if e["type"] == "token"] == ["a", "b", "c"]
    assert got[-1]["type"] == "done" and waiter.diverged is None


def test_the_waiter_ends_the_stream_with_an_error_when_a_retry_differs():
    got, waiter = follow([tok(0, [1, 2], 0, "ab"), tok(0, [1, 7], 0, "aq"),
                          tok(2, [3], 2, "c"), {"type": "done"}])
    assert [e["type"] for e in got] == ["token", "error"]
    assert "its worker stopped" in got[-1]["error"]["message"]
    assert waiter.diverged and "GET /v1/invocations/inv_x" in waiter.diverged


@pytest.mark.parametrize("text,stops,held", [
    ("hello wor", ("world",), 3),
    ("hello", ("world",), 0),
    ("say E", ("END", "EOF"), 1),
    ("say EN", ("END", "EOF"), 2),
    ("abc", (), 0),
    ("xx", ("xxx",), 2),
])
def test_held_back_is_the_longest_end_that_starts_a_stop_string(text, stops, held):
    assert held_back(text, stops) == held


def test_a_replay_slices_every_per_token_list():
    c = StreamCursor()
    c.advance(tok(0, [1, 2], 0, "ab"))
    out = c.advance(tok(1, [2, 3], 1, "bc", logprobs=[-0.2, -0.3],
                        top_logprobs=[[[2, -0.2]], [[3, -0.3]]], text_offsets=[1, 2]))
    assert out["token_ids"] == [3]
    assert (out["logprobs"], out["top_logprobs"], out["text_offsets"]) == (
        [-0.3], [[[3, -0.3]]], [2])
