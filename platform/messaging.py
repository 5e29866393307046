"""RabbitMQ plumbing for requests and replies (pika: a raw AMQP client fits these two loops
better than Celery, which carries the node and scheduler tasks).

- ``fn.<function_id>.v<version>``: durable request queue of a function version; messages are persistent, acked by
  stage 0 of a serving group only after the result is in Postgres, so a worker that dies hands
  its requests back to the queue.
- ``reply.<uuid>``: one exclusive queue per API process; workers publish token events there with
  the invocation id as correlation id, and a listener thread hands them to the waiting request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import uuid
from typing import Any

import pika
from pika.exceptions import AMQPError

log = logging.getLogger(__name__)


def request_queue(function_id: int, version: int, prefix: str = "") -> str:
    """One queue per function version: after an alias move, old workers never take requests
    meant for the new version."""
    return f"{prefix}fn.{function_id}.v{version}"


def node_queue(node_id: str, prefix: str = "") -> str:
    return f"{prefix}node.{node_id}"


def pika_url(url: str) -> str:
    """Celery/kombu write the default vhost as a trailing ``//``; pika wants ``/%2F``."""
    url = url.replace("pyamqp://", "amqp://")
    return url[:-2] + "/%2F" if url.endswith("//") else url


def connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(pika_url(url))
    params.heartbeat = 30
    params.blocked_connection_timeout = 30
    return pika.BlockingConnection(params)


class Publisher:
    """Thread-safe publishing: one connection per thread, re-opened after a broker restart.
    With ``confirm`` each publish returns only once the broker holds the message (requests);
    without, it returns at once (token events, which Postgres backs up anyway)."""

    def __init__(self, url: str, confirm: bool = True) -> None:
        self.url = url
        self.confirm = confirm
        self._local = threading.local()

    def _channel(self):
        ch = getattr(self._local, "channel", None)
        if ch is None or ch.is_closed:
            conn = connect(self.url)
            ch = conn.channel()
            if self.confirm:
                ch.confirm_delivery()
            self._local.conn, self._local.channel, self._local.declared = conn, ch, set()
        return ch

    def publish(self, queue_name: str, body: dict[str, Any], reply_to: str | None = None,
                correlation_id: str | None = None, durable: bool = True) -> None:
        payload = json.dumps(body).encode()
        props = pika.BasicProperties(content_type="application/json", reply_to=reply_to,
                                     correlation_id=correlation_id,
                                     delivery_mode=2 if durable else 1)
        for attempt in (1, 2):
            try:
                ch = self._channel()
                if durable and queue_name not in self._local.declared:
                    ch.queue_declare(queue_name, durable=True)
                    self._local.declared.add(queue_name)
                ch.basic_publish("", queue_name, payload, props, mandatory=durable and self.confirm)
                return
            except AMQPError:
                self._drop()
                if attempt == 2:
                    raise

    def _drop(self) -> None:
        """Forgets this thread's connection, closing it if it is still open."""
        conn, self._local.channel = getattr(self._local, "conn", None), None
        if conn is not None and conn.is_open:
            with contextlib.suppress(AMQPError):  # already broken: nothing more to release
                conn.close()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.is_open:
            conn.close()


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
