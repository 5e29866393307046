"""A generic worker process: boots (torch imported, device initialised), waits for a stage
assignment, cold-starts the stage from the node cache, then serves it.

Protocol on the pool's pipe (tuples, pickled)::

    worker -> pool   ("idle", {pid, spawned, booted})        after boot
    pool -> worker   ("assign", StageAssignment, prestarted, assigned_at) or ("stop",)
    worker -> pool   ("ready", report)                       stage loaded and serving
    pool -> worker   ("consolidate", {...})  to a stage server: read by a ControlInbox thread
    pool -> worker   ("generate", [(request_id, prompt_ids, SamplingParams), ...])   stage 0
    worker -> pool   ("result", {outputs, first_token, finished})
    pool -> worker   ("stop",)  stage 0 stops the ring; other stages stop when the ring does
    worker -> pool   ("stopped", {})  or  ("error", {type, message, traceback}) at any point

Forked from the pool's fork server (or spawned), never from the node process itself: a child
forked from that would inherit its threads and (on GPUs) a CUDA context it must not use. The
fork server has neither; the environment the worker runs with is the node's when the pool
started it (``WorkerBoot.env``), as a spawned process's would be, not the fork server's.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any


@dataclass(frozen=True, slots=True)
class WorkerBoot:
    """How the pool starts a worker."""

    device: str = "cpu"
    num_threads: int | None = None
    spawned_at: float = 0.0  # wall clock when the pool started the process
    preload: tuple[str, ...] = ()  # modules of the pool's StageServer classes, imported at boot
    cpu_devices: int = 1  # the node's CPU devices: slices of its cores (gpu_runtime/devices.py)
    env: tuple[tuple[str, str], ...] = ()  # the pool's environment when it started the worker


def worker_main(conn: Connection, boot: WorkerBoot) -> None:
    """Process entry point (``multiprocessing`` forkserver or spawn target)."""
    _die_with_parent()
    if boot.env:
        os.environ.clear()
        os.environ.update(boot.env)
    try:
        _boot(boot)
    except BaseException as exc:  # noqa: BLE001 - reported to the pool, then the process ends
        _send_error(conn, exc)
        return
    conn.send(("idle", {"pid": os.getpid(), "spawned": boot.spawned_at, "booted": time.time()}))
    msg = conn.recv()
    if msg[0] != "assign":
        conn.send(("stopped", {}))
        return
    _, assignment, prestarted, assigned_at = msg
    try:
        # init starts when the pool handed the stage over, or, for a process started for this
        # stage, when the pool started it: its boot is part of this stage's init
        _serve(conn, assignment, boot, assigned_at if prestarted else boot.spawned_at,
               prestarted)
    except BaseException as exc:  # noqa: BLE001 - reported to the pool, then the process ends
        _send_error(conn, exc)


def _die_with_parent() -> None:
    """On Linux, SIGTERM this worker when the node process that started it dies, so a killed
    node does not leave workers serving behind the scheduler's back."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# the runtime a worker imports at boot, so that a stage costs no import (a pool's fork server
# imports them once for every worker it forks, coldstart/pool.py FORKSERVER_PRELOAD)
BOOT_IMPORTS = ("gpu_runtime.coldstart.runtime", "gpu_runtime.coldstart.stream",
                "gpu_runtime.pipeline")


def _boot(boot: WorkerBoot) -> None:
    """Imports the whole runtime and initialises the device: what a pre-started worker has
    already paid for when a stage arrives."""
    import importlib

    from gpu_runtime.devices import DeviceName

    for module in BOOT_IMPORTS:
        importlib.import_module(module)
    runtime = importlib.import_module("gpu_runtime.coldstart.runtime")
    runtime.init_device(DeviceName.parse(boot.device).torch_device(), boot.num_threads)
    for module in boot.preload:
        importlib.import_module(module)


def _send_error(conn: Connection, exc: BaseException) -> None:
    with contextlib.suppress(OSError, ValueError):  # the pool is gone: nothing to tell
        conn.send(("error", {"type": type(exc).__name__,
                             "message": getattr(exc, "message", None) or str(exc),
                             "traceback": traceback.format_exc(limit=20)}))


def _serve(conn: Connection, assignment, boot: WorkerBoot, init_start: float,
           prestarted: bool) -> None:
    from gpu_runtime import devices
    from gpu_runtime.coldstart.runtime import PreparedStageWorker, RuntimeInit, engine_for
    from gpu_runtime.coldstart.stream import stream_stage
    from gpu_runtime.config import parse_config
    from gpu_runtime.loader import resolve_dtype
    from gpu_runtime.memory import stage_report
    from gpu_runtime.prefetch import open_buffer

    plan = assignment.plan
    # the plan's device and share: pinned to its cores (CPU) or its device, allocator capped
    bound = devices.bind(plan.device, boot.cpu_devices, boot.num_threads,
                         plan.memory_bytes if plan.cap_memory else 0)
    device = devices.DeviceName.parse(plan.device).torch_device()
    prepared = _start_prepare(plan)  # the stage server's own setup, overlapping the load
    config = parse_config(plan.config)
    dtype = resolve_dtype(plan.engine.dtype, config)
    # pages of the pool exist already (the node pre-faults it): map them all now, during the
    # fetch, so neither loading nor the first forward takes a page fault per 4 KiB
    buffer = open_buffer(assignment.handle, populate=True)
    init = RuntimeInit(plan, config, dtype, device)
    init.start()
    loaded = stream_stage(config, plan.spec, buffer, assignment.layout, dtype, device)
    parts = init.result()
    report = {"pid": os.getpid(), "stage": plan.spec.index, "node": assignment.node,
              "device": bound, "prestarted": prestarted, "init_start": init_start, "init_end": parts.ended,
              "load_end": loaded.stats.load_end, "load": loaded.stats.to_dict(),
              "memory": stage_report(loaded.stage, parts.kv, plan.memory_bytes,
                                     loaded.stats.num_bytes)}
    if not plan.spec.is_first:
        assert parts.channel is not None, f"stage {plan.spec.index} has no channel"
        replica = _ReplicaControl(conn, loaded.stage, plan) if plan.replica else None
        conn.send(("ready", report | {"ready": time.time()}))
        worker = PreparedStageWorker(loaded.stage, parts.channel, parts.kv)
        try:
            worker.serve()
        finally:
            parts.channel.close()
        if replica is not None and worker.stopped_with.get("consolidated"):
            _serve_replica(replica, plan, report)
        conn.send(("stopped", {}))
        return
    engine = engine_for(loaded.stage, parts, plan)  # pp > 1: waits for the whole ring
    report["ready"] = time.time()
    conn.send(("ready", report))
    try:
        if plan.server is not None:
            assert prepared is not None, "a stage server's prepare was not started"
            from gpu_runtime.coldstart.handoff import ControlInbox

            plan.server.serve(engine, report, prepared.result(), ControlInbox(conn))
        else:
            _serve_requests(conn, engine)
    finally:
        engine.close()
    conn.send(("stopped", {}))


class _ReplicaControl:
    """A later stage with a full share: starts loading the whole model when its node hands
    over the rest (``("consolidate", {...})``), while the stage keeps serving the ring."""

    def __init__(self, conn: Connection, stage, plan) -> None:
        from gpu_runtime.coldstart.handoff import ControlInbox

        self.stage, self.plan = stage, plan
        self.loader: Any = None  # a WholeLoader once the rest was handed over
        self.refused: str | None = None  # why the node could not hand it over
        self.inbox = ControlInbox(conn, self._on_message)

    def _on_message(self, msg: tuple) -> None:
        from gpu_runtime.consolidate import WholeLoader, buffers_loader

        if msg[0] == "no_replica":
            self.refused = msg[1]
        elif msg[0] == "consolidate" and self.loader is None:
            shape = self.plan.engine
            self.loader = WholeLoader(self.stage, msg[1]["spec"],
                                      buffers_loader(msg[1]["sources"]), shape.num_kv_blocks,
                                      shape.block_size)


REPLICA_LOAD_TIMEOUT_S = 600.0


def _serve_replica(replica: _ReplicaControl, plan, report: dict) -> None:
    """After the ring stopped: the whole model, once loaded, serves requests on its own."""
    from gpu_runtime.coldstart.runtime import load_tokenizer
    from gpu_runtime.engine import EngineConfig, LLMEngine
    from gpu_runtime.model_runner import LocalRunner

    deadline = time.monotonic() + REPLICA_LOAD_TIMEOUT_S
    while replica.loader is None:  # the node is still fetching the rest for this stage
        if replica.refused is not None:
            raise RuntimeError(f"no replica: {replica.refused}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the rest of the model did not arrive within "
                               f"{REPLICA_LOAD_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    whole = replica.loader.result(max(deadline - time.monotonic(), 1.0))
    shape = plan.engine
    config = EngineConfig(model=plan.uri, dtype=shape.dtype, device=str(whole.stage.device),
                          block_size=shape.block_size, num_kv_blocks=shape.num_kv_blocks,
                          num_threads=shape.num_threads)
    engine = LLMEngine.from_loaded(config, [whole.stage.spec], whole.kv,
                                   LocalRunner(whole.stage, whole.kv), load_tokenizer(plan.uri))
    report = report | {"replica_load_start": whole.load_start,
                       "replica_load_end": whole.load_end, "ready": time.time()}
    try:
        plan.replica.serve(engine, report, plan.replica.prepare(), replica.inbox)
    finally:
        engine.close()


def _start_prepare(plan) -> Future | None:
    """Runs the stage server's ``prepare`` in a thread; its error surfaces at ``result()``."""
    if plan.server is None:
        return None
    server, future = plan.server, Future[Any]()

    def run() -> None:
        try:
            future.set_result(server.prepare())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the result
            future.set_exception(exc)

    # a daemon thread: a worker whose load failed exits without waiting for it
    threading.Thread(target=run, name="prepare", daemon=True).start()
    return future


def _serve_requests(conn: Connection, engine) -> None:
    """Stage 0's control loop: run batches of requests until told to stop."""
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        assert msg[0] == "generate", f"stage 0 got unknown command {msg[0]!r}"
        for request_id, prompt_ids, params in msg[1]:
            engine.add_request(request_id, prompt_ids, params)
        outputs: dict[str, list[int]] = {rid: [] for rid, _, _ in msg[1]}
        first_token = None
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id].extend(out.new_token_ids)
                if first_token is None and out.new_token_ids:
                    first_token = time.time()
        conn.send(("result", {"outputs": outputs, "first_token": first_token,
                              "finished": time.time()}))
