"""RabbitMQ plumbing: queue names, connections and a thread-safe publisher (pika: a raw AMQP
client fits the request and reply loops better than Celery, which carries the node tasks).

- ``fn.<function_id>.v<version>``: durable request queue of a function version; messages are
  persistent, acked by stage 0 of a serving group only after the result is in Postgres, so a
  worker that dies hands its requests back to the queue.
- ``node.<node_id>``: a node agent's Celery queue (the scheduler's start and stop tasks).
- ``reply.<uuid>``: one exclusive queue per API process (``invocations.replies``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
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
