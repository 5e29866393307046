"""The reply stream: each API process consumes one exclusive ``reply.<uuid>`` queue, workers
publish token and outcome events there with the invocation id as correlation id, and a
``Waiter`` follows one invocation, with Postgres as the fallback when events are missed."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from pika.exceptions import AMQPError
from sqlalchemy.orm import Session

from hydraserve.broker import connect
from hydraserve.db import must_get
from hydraserve.invocations.models import FINISHED, Invocation
from hydraserve.invocations.service import cancel

log = logging.getLogger(__name__)
DB_POLL_S = 1.0


class ReplyListener:
    """Consumes this process's reply queue in a thread and routes events by correlation id."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.queue_name = f"reply.{uuid.uuid4().hex[:16]}"
        self._waiters: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reply-listener", daemon=True)

    def start(self, timeout_s: float = 10.0) -> "ReplyListener":
        self._thread.start()
        self._ready.wait(timeout_s)
        return self

    def subscribe(self, correlation_id: str) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._waiters[correlation_id] = q
        return q

    def unsubscribe(self, correlation_id: str) -> None:
        with self._lock:
            self._waiters.pop(correlation_id, None)

    def _run(self) -> None:
        while True:  # reconnect forever: waiters fall back to Postgres meanwhile
            try:
                conn = connect(self.url)
                ch = conn.channel()
                ch.queue_declare(self.queue_name, exclusive=True, auto_delete=True)
                ch.basic_consume(self.queue_name, self._on_message, auto_ack=True)
                self._ready.set()
                ch.start_consuming()
            except AMQPError as exc:
                log.warning("reply listener lost the broker (%s); reconnecting", exc)
                threading.Event().wait(1.0)

    def _on_message(self, _ch, _method, props, body: bytes) -> None:
        with self._lock:
            q = self._waiters.get(props.correlation_id or "")
        if q is not None:
            q.put(json.loads(body))


class ReplayDiverged(Exception):
    """A retried attempt generated something else than what the client was already sent."""


@dataclass(slots=True)
class StreamCursor:
    """What one client has been sent of an invocation's output. A worker that dies mid-stream
    leaves the request to a retry, which generates from token 0 again (same seed, so the same
    continuation): each token event says where it starts (``index`` in tokens,
    ``text_offset`` in characters), and only what lies past the cursor goes out. A replay that
    differs from what was sent raises ``ReplayDiverged``."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""

    def advance(self, event: dict) -> dict | None:
        """The part of a token event the client has not seen, or None when it has seen all."""
        if "index" not in event:  # a worker that does not say where its tokens start
            self.token_ids += event["token_ids"]
            self.text += event["text"]
            return event
        new_ids = self._past(self.token_ids, event["token_ids"], event["index"], "tokens")
        new_text = self._past(self.text, event["text"], event["text_offset"], "text")
        if not new_ids and not new_text:
            return None
        # what goes out starts where the client is: its positions say so too
        out = event | {"token_ids": new_ids, "text": new_text, "index": len(self.token_ids),
                       "text_offset": len(self.text)}
        self.token_ids += new_ids
        self.text += new_text
        skipped = len(event["token_ids"]) - len(new_ids)
        for key in ("logprobs", "top_logprobs", "text_offsets"):  # one entry per token
            if key in event:
                out[key] = event[key][skipped:]
        return out

    @staticmethod
    def _past(sent, part, start: int, what: str):
        """``part`` (placed at ``start``) without what overlaps ``sent``, which must match."""
        if start > len(sent):
            raise ReplayDiverged(f"the {what} skip from {len(sent)} to {start}")
        overlap = sent[start:start + len(part)]
        if part[:len(overlap)] != overlap:
            raise ReplayDiverged(f"a retry generated other {what} than were streamed at {start}")
        return part[len(overlap):]


@dataclass(slots=True)
class Waiter:
    """Follows one invocation: token events from the reply queue, Postgres as the fallback.
    Uses a short-lived session per look, so it outlives the request's own session (SSE).
    The worker's ``done`` event carries the row it has just committed; then ``load`` needs no
    query. A request with ``n`` choices streams each choice's tokens with its ``choice`` index
    (none: choice 0), and each choice has its own cursor: positions are per choice."""

    sessions: Callable[[], Session]
    listener: ReplyListener
    inv_id: str
    events: queue.Queue
    final: Invocation | None = None
    cursors: dict[int, StreamCursor] = field(default_factory=dict)  # by choice
    diverged: str | None = None  # why the stream was ended early, if it was
    on_close: Callable[[], None] | None = None  # called once, by the first close()

    def close(self) -> None:
        self.listener.unsubscribe(self.inv_id)
        done, self.on_close = self.on_close, None
        if done is not None:
            done()

    def load(self) -> Invocation:
        if self.final is not None:
            return self.final
        with self.sessions() as s:
            inv = must_get(s, Invocation, self.inv_id)
            s.expunge(inv)
            return inv

    def cancel(self) -> None:
        with self.sessions() as s:
            cancel(s, must_get(s, Invocation, self.inv_id))

    def wait(self, deadline_s: float) -> Invocation:
        """Follows until the outcome or the deadline, stops listening, and returns the row as
        it is then (finished or not)."""
        try:
            for _event in self.follow(deadline_s):
                pass
        finally:
            self.close()
        return self.load()

    def follow(self, deadline_s: float, tick_s: float = 1.0) -> Iterator[dict | None]:
        """Yields token events as they come and ``None`` every ``tick_s`` of silence (SSE
        keep-alive); ends after the ``done``/``error`` event, or when the row is finished, or at
        the deadline."""
        end = time.monotonic() + deadline_s
        last_poll = time.monotonic()
        while time.monotonic() < end:
            try:
                event = self.events.get(timeout=min(tick_s, max(end - time.monotonic(), 0.01)))
            except queue.Empty:
                event = None
            if event is not None:
                if "invocation" in event:
                    self.final = detached(event.pop("invocation"))
                if event["type"] == "token":
                    try:
                        event = self.cursor(event.get("choice", 0)).advance(event)
                    except ReplayDiverged as exc:
                        yield self._diverged(str(exc))
                        return
                    if event is None:  # a retry replaying what was sent already
                        continue
                yield event
                if event["type"] in ("done", "error"):
                    return
                continue
            if time.monotonic() - last_poll >= DB_POLL_S:
                last_poll = time.monotonic()
                if self.load().status in FINISHED:
                    return
            yield None

    def cursor(self, choice: int = 0) -> StreamCursor:
        """What the client has been sent of one choice."""
        return self.cursors.setdefault(choice, StreamCursor())

    def _diverged(self, why: str) -> dict:
        self.diverged = (f"the stream ends here: its worker stopped and {why}; GET "
                         f"/v1/invocations/{self.inv_id} has the whole output once it is done")
        return {"type": "error", "error": {"type": "service_unavailable", "param": None,
                                           "message": self.diverged}}


def detached(row: dict) -> Invocation:
    """An Invocation from a ``done`` event's row (ISO timestamps), bound to no session."""
    times = {k: datetime.fromisoformat(v) for k, v in row.items() if k.endswith("_at") and v}
    return Invocation(**(row | times))
