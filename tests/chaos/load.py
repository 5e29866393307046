"""Steady load for the chaos suite: per tenant, sync and streaming clients that invoke in a
loop for a bounded time, recording every accepted invocation, every stream's token positions
(a token twice or out of order is counted) and when each answer came.

An invocation counts as accepted when its id came back: in the body of a sync answer, or in
the headers of a stream, even when the connection dies afterwards (an API process killed
mid-stream). A request whose connection died before any answer is not accepted by the client;
the suite follows such requests from Postgres instead (``faults.settle_unacknowledged``)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import requests

BODY = {"prompt_ids": [1, 5, 9, 13, 200, 31], "max_tokens": 24}
REFUSED_PAUSE_S = 0.2


@dataclass
class Tally:
    accepted: list[str] = field(default_factory=list)  # invocation ids
    refused: int = 0  # 429 / 503 before acceptance: not accepted, nothing to lose
    duplicated_tokens: int = 0  # token events starting before what the client already had
    # sent, got, status, invocation id (None when none came back)
    answers: list[tuple[float, float, str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, inv_id: str | None, sent: float, status: str) -> None:
        with self.lock:
            if inv_id:
                self.accepted.append(inv_id)
            self.answers.append((sent, time.time(), status, inv_id))


@dataclass
class Client:
    base: str
    key: str
    function: str
    stream: bool
    tally: Tally

    def url(self) -> str:
        return f"{self.base}/v1/functions/{self.function}/invocations?timeout_s=60"

    def headers(self) -> dict:
        h = {"Authorization": f"Bearer {self.key}"}
        return h | ({"Accept": "text/event-stream"} if self.stream else {})

    def once(self) -> None:
        sent, inv_id = time.time(), None
        try:
            with requests.post(self.url(), json=BODY, headers=self.headers(), timeout=90,
                               stream=self.stream) as resp:
                if resp.status_code in (429, 503):
                    with self.tally.lock:
                        self.tally.refused += 1
                    time.sleep(REFUSED_PAUSE_S)  # as a client told to retry later would
                    return
                inv_id = resp.headers.get("X-Invocation-Id")
                if self.stream and resp.status_code == 200:
                    status = self._read_stream(resp)
                else:
                    data = resp.json()
                    inv_id = inv_id or data.get("id")
                    status = data.get("status", f"http {resp.status_code}")
        except (requests.RequestException, ValueError) as exc:  # an API process died mid-answer
            # accepted all the same if the id had come back (a stream's headers)
            self.tally.add(inv_id, sent, f"client error {type(exc).__name__}")
            return
        self.tally.add(inv_id, sent, status)

    def _read_stream(self, resp) -> str:
        received, status = 0, "no final event"
        for line in resp.iter_lines(decode_unicode=True):
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("type") == "token":
                if event.get("index", received) != received:
                    with self.tally.lock:
                        self.tally.duplicated_tokens += 1
                received = event.get("index", received) + len(event["token_ids"])
            elif event.get("object") == "invocation":
                status = event["status"]
        return status


class Load:
    """Runs the clients in threads until ``stop``."""

    def __init__(self, clients: list[Client]) -> None:
        self.clients = clients
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(c,), daemon=True)
                         for c in clients]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def _loop(self, client: Client) -> None:
        while not self._stop.is_set():
            client.once()

    def stop(self, timeout_s: float = 120.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)
