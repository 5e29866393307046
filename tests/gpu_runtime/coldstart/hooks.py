"""A stand-in for a caller's request loop (the platform's), for the worker's ``preload``,
``prepare`` and ``serve`` hooks; imported by name inside spawned pool workers."""

from __future__ import annotations

import json
import os
import threading
import time

IMPORTED_AT = time.time()  # with ``preload``: when the worker booted, before any stage


def prepare(args: dict) -> dict:
    started = time.time()
    if args.get("fail"):
        raise RuntimeError("prepare hook failed on purpose")
    return {"started": started, "thread": threading.current_thread().name, "pid": os.getpid()}


def serve(engine, args: dict, report: dict, prepared: dict | None = None) -> None:
    from gpu_runtime.sampling import SamplingParams

    engine.add_request("r", [1, 5, 9], SamplingParams(max_tokens=3, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    with open(args["out"], "w") as f:
        json.dump({"prepared": prepared, "imported_at": IMPORTED_AT, "tokens": tokens,
                   "load_end": report["load_end"], "pid": os.getpid()}, f)
