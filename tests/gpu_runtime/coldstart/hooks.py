"""A stand-in for a caller's request loop (the platform's): a ``StageServer`` that runs one
request and writes what it saw; its module is imported at boot by pools that preload it."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass

IMPORTED_AT = time.time()  # with ``preload``: when the worker booted, before any stage


@dataclass(frozen=True, slots=True)
class RecordingServer:
    out: str
    fail: bool = False

    def prepare(self) -> dict:
        started = time.time()
        if self.fail:
            raise RuntimeError("prepare hook failed on purpose")
        return {"started": started, "thread": threading.current_thread().name,
                "pid": os.getpid(), "env": os.environ.get("HYDRA_TEST_MARK")}

    def serve(self, engine, report: dict, prepared: dict, control=None) -> None:
        from gpu_runtime.sampling import SamplingParams

        engine.add_request("r", [1, 5, 9], SamplingParams(max_tokens=3, ignore_eos=True))
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
        with open(self.out, "w") as f:
            json.dump({"prepared": prepared, "imported_at": IMPORTED_AT, "tokens": tokens,
                       "load_end": report["load_end"], "pid": os.getpid()}, f)
