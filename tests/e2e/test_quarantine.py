"""A request that kills its worker, on a real local cluster: the worker aborts while prefilling
it (fault injection, HYDRA_FAULT_ABORT_PROMPT, as a crash in native code would), the request is
quarantined after that one death with the cause, the requests that were decoding in the same
worker finish elsewhere with every token once, and the function serves again."""

from __future__ import annotations

import json
import threading
from datetime import datetime

import pytest

from tests.e2e.serving_cluster import Cluster, running_cluster

POISON = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(scope="module")
def cluster(store_root, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRA_FAULT_ABORT_PROMPT", ",".join(map(str, POISON)))
        with running_cluster(store_root, tmp_path_factory, "quar") as c:
            yield c


class Stream(threading.Thread):
    """A streaming invocation read to its end; ``started`` is set at its first token."""

    def __init__(self, cluster: Cluster, body: dict) -> None:
        super().__init__(daemon=True)
        self.cluster, self.body = cluster, body
        self.started = threading.Event()
        self.tokens: list[dict] = []
        self.final: dict = {}

    def run(self) -> None:
        resp = self.cluster.invoke("q", self.body, headers={"Accept": "text/event-stream"},
                                   stream=True)
        for line in resp.iter_lines(decode_unicode=True):
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("type") == "token":
                self.tokens.append(event)
                self.started.set()
            elif event.get("object") == "invocation":
                self.final = event
        self.started.set()


def test_a_request_that_kills_its_worker_is_quarantined_and_only_it_fails(cluster: Cluster,
                                                                         store_root):
    cluster.register("q", store_root / "llama-tiny", keep_alive_s=3600)
    warm = cluster.invoke("q", {"prompt_ids": [1, 2], "max_tokens": 2}).json()
    assert warm["status"] == "succeeded", warm
    streams = [Stream(cluster, {"prompt_ids": [7, 8, 9 + i], "max_tokens": 400,
                                "temperature": 0.8, "seed": i}) for i in range(3)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(120), "a stream never started"

    poison = cluster.invoke("q", {"prompt_ids": POISON, "max_tokens": 4}).json()
    assert poison["status"] == "failed", poison
    assert poison["error"]["message"].startswith("quarantined: the worker serving it"), poison
    assert "exited with code -6" in poison["error"]["message"]

    for s in streams:
        s.join(240)
        assert s.final.get("status") == "succeeded", s.final
        # every token once, in order, though the worker died in the middle of the stream
        indexes = [e["index"] for e in s.tokens]
        assert indexes == sorted(set(indexes))
        got = [t for e in s.tokens for t in e["token_ids"]]
        assert got == s.final["output"]["token_ids"]
        assert "".join(e["text"] for e in s.tokens) == s.final["output"]["text"]
    deaths = cluster.query(
        "SELECT i.error, i.released_at FROM instances i"
        " JOIN function_versions v ON v.id = i.function_version_id"
        " JOIN functions f ON f.id = v.function_id WHERE f.name = 'q' AND i.status = 'failed'")
    assert len(deaths) == 1, deaths  # the poison took down one worker, not three
    assert "-6" in deaths[0].error
    # those still decoding in the worker when it died went on in a new one, not quarantined
    # (a stream that met its end of sequence before the death had finished in the first)
    died_at = deaths[0].released_at
    for s in streams:
        ended = datetime.fromisoformat(s.final["timings"]["finished_at"])
        assert s.final["attempts"] == 2 or ended < died_at, (s.final, died_at)
    assert any(s.final["attempts"] == 2 for s in streams)
    (row,) = cluster.query("SELECT attempts, worker_deaths FROM invocations WHERE id = :id",
                           id=poison["id"])
    assert (row.attempts, row.worker_deaths) == (1, 1)
    again = cluster.invoke("q", {"prompt_ids": [1, 2], "max_tokens": 2}).json()
    assert again["status"] == "succeeded", again
