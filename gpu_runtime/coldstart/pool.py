"""The node's pool of pre-started generic workers.

    pool = WorkerPool(WorkerPoolConfig(node_id="n1", num_prestarted=2))
    handle = pool.assign(assignment)      # a booted worker if one is free, else a new process
    report = handle.wait_ready(600)
    result = handle.generate([("r1", [1, 2, 3], SamplingParams(max_tokens=8))])   # stage 0

A pre-started worker has imported torch and the runtime and initialised its device, so taking
it removes process start from the cold start's critical path. When none is free the pool
starts one at once: the node has already started the fetch, so the new process boots while
the bytes arrive. With ``refill`` the pool starts a replacement whenever it hands one out.

Workers are forked from a fork server (``multiprocessing``'s ``forkserver``): one process per
node that imports torch and the runtime once (``FORKSERVER_PRELOAD``, and the modules of the
pool's StageServer classes) and never runs anything, so it holds no threads and no CUDA
context a fork could inherit. A worker forked from it boots in milliseconds instead of the
seconds of importing torch (3.6 s on an idle 2-core machine, about 10 s on a busy one), and
shares those pages with its siblings. It dies with the node as a spawned one does: the fork
server exits when its node process does, and the worker's parent-death signal follows.
``start_method="spawn"`` starts each worker from scratch instead; ``"auto"`` (the default) is
the fork server on a CPU node and spawn on a node with a CUDA device or device setting, until a
GPU run has checked that nothing the fork server imports initialises CUDA (a child forked
after that could not use it).
The pool is a data-plane library: the node agent (a Celery worker) owns one and drives it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from gpu_runtime.coldstart.errors import (
    AssignmentError,
    PoolClosedError,
    WorkerDiedError,
    WorkerFailedError,
    WorkerStartError,
    WorkerTimeoutError,
)
from gpu_runtime.coldstart.handoff import check_server_class
from gpu_runtime.coldstart.plan import StageAssignment
from gpu_runtime.coldstart.worker import BOOT_IMPORTS, WorkerBoot, worker_main
from gpu_runtime.devices import DeviceName, DeviceNameError, cpu_device_count
from gpu_runtime.sampling import SamplingParams

POLL_S = 0.05
MAX_PRESTARTED = 64
START_METHODS = ("auto", "forkserver", "spawn")
# imported once by the fork server: what every worker needs before its first stage (torch's
# meta-device path, which the boot warms, imports torch._dynamo: 2.4 s of the boot by itself)
FORKSERVER_PRELOAD = ("torch", "torch._dynamo", "torch._refs", "gpu_runtime.coldstart.worker",
                      *BOOT_IMPORTS)


@dataclass(frozen=True, slots=True)
class WorkerPoolConfig:
    """One node's pool: how many idle workers to keep, on which device, with how many threads."""

    node_id: str = "local"
    num_prestarted: int = 1
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N": where pre-started workers boot
    # The node's devices, as plans name them (gpu_runtime/devices.py): pre-started workers
    # boot round-robin on its CUDA devices (a CUDA context is made at boot, for one device);
    # on CPU they boot unbound and are pinned to the stage's slice of cores when assigned.
    devices: tuple[str, ...] = ()
    num_threads: int | None = None
    refill: bool = True  # start a replacement whenever a pre-started worker is taken
    # StageServer classes this pool's workers will be handed: their modules are imported at
    # boot, paid for by a pre-started worker before any cold start instead of during one
    preload: tuple[type, ...] = ()
    boot_timeout_s: float = 180.0
    start_method: str = "auto"  # "forkserver", or "spawn": each worker imports everything

    @property
    def method(self) -> str:
        """The start method in use: ``auto`` is spawn where a CUDA device is named."""
        if self.start_method != "auto":
            return self.start_method
        cuda = any(DeviceName.parse(d).kind == "cuda" for d in (self.device, *self.devices))
        return "spawn" if cuda else "forkserver"

    @property
    def preload_modules(self) -> tuple[str, ...]:
        """The modules of the ``preload`` classes, imported before a worker's first stage."""
        return tuple(cls.__module__ for cls in self.preload)

    @property
    def cpu_devices(self) -> int:
        """How many CPU devices the node has (each is a slice of its cores)."""
        return cpu_device_count(self.devices)

    def boot_device(self, k: int) -> str:
        """Where the ``k``-th pre-started worker boots."""
        cuda = [d for d in self.devices if DeviceName.parse(d).kind == "cuda"]
        return cuda[k % len(cuda)] if cuda else self.device

    def __post_init__(self) -> None:
        if not 0 <= self.num_prestarted <= MAX_PRESTARTED:
            raise AssignmentError(f"num_prestarted={self.num_prestarted}; allowed "
                                  f"0..{MAX_PRESTARTED}", "num_prestarted")
        for name in (self.device, *self.devices):
            try:
                DeviceName.parse(name)
            except DeviceNameError as exc:
                raise AssignmentError(str(exc), "device") from None
        if self.num_threads is not None and self.num_threads < 1:
            raise AssignmentError(f"num_threads={self.num_threads}; allowed >= 1 or None",
                                  "num_threads")
        for cls in self.preload:
            check_server_class(cls)
        if self.boot_timeout_s <= 0:
            raise AssignmentError(f"boot_timeout_s={self.boot_timeout_s}; must be > 0",
                                  "boot_timeout_s")
        if self.start_method not in START_METHODS:
            raise AssignmentError(f"start_method={self.start_method!r}; allowed "
                                  f"{', '.join(START_METHODS)}", "start_method")


def worker_context(config: WorkerPoolConfig):
    """The ``multiprocessing`` context the pool's workers start from. The fork server's
    preload is fixed when it first starts (once per process): a later pool's StageServer
    modules are imported by each worker's boot instead."""
    ctx = mp.get_context(config.method)
    if config.method == "forkserver":
        ctx.set_forkserver_preload([*FORKSERVER_PRELOAD, *config.preload_modules])
    return ctx


class _Worker:
    """The pool's side of one process: the process, its pipe, and its boot report."""

    def __init__(self, proc: mp.process.BaseProcess, conn: Connection, spawned_at: float,
                 device: str, timed: bool = True) -> None:
        self.proc, self.conn, self.spawned_at = proc, conn, spawned_at
        self.device = device  # where it booted
        self.booted: dict | None = None
        self.timed = timed  # its boot is what a later worker's costs (see WorkerPool.boot_s)

    def can_run(self, device: str) -> bool:
        """Whether a stage planned on ``device`` may run here: a CUDA worker on the device it
        booted on, an (unbound) CPU worker on any CPU device."""
        if DeviceName.parse(device).kind == "cpu":
            return DeviceName.parse(self.device).kind == "cpu"
        return DeviceName.parse(device).torch_device() == DeviceName.parse(self.device).torch_device()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None, "worker process has no pid (not started)"
        return self.proc.pid

    def recv(self, timeout_s: float | None, what: str) -> tuple:
        """Next message other than the boot report; raises the worker's error, its death or a
        timeout as typed errors."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self.conn.poll(POLL_S):
                try:
                    msg = self.conn.recv()
                except EOFError as exc:
                    raise self._died(what) from exc
                if msg[0] == "idle":
                    self.booted = msg[1]
                    continue
                if msg[0] == "error":
                    info = msg[1]
                    raise WorkerFailedError(
                        f"worker {self.pid} failed while {what}: {info['type']}: "
                        f"{info['message']}\n{info['traceback']}", info["type"])
                return msg
            if not self.proc.is_alive() and not self.conn.poll(0):
                raise self._died(what)
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerTimeoutError(f"worker {self.pid} did not finish {what} within "
                                         f"{timeout_s} s")

    def _died(self, what: str) -> WorkerDiedError:
        self.proc.join(1.0)
        return WorkerDiedError(f"worker {self.proc.pid} exited (code {self.proc.exitcode}) "
                               f"while {what}")

    def poll_boot(self) -> bool:
        """True once the boot report arrived (non-blocking); raises if the boot failed."""
        if self.booted is None and self.conn.poll(0):
            try:
                msg = self.conn.recv()
            except EOFError:  # it died before it could say anything (killed, out of memory)
                raise WorkerStartError(f"worker {self.pid} exited (code {self.proc.exitcode}) "
                                       "during boot") from None
            if msg[0] == "error":
                raise WorkerStartError(f"worker {self.pid} failed to boot: {msg[1]['type']}: "
                                       f"{msg[1]['message']}")
            assert msg[0] == "idle", f"booting worker {self.pid} sent {msg[0]!r}"
            self.booted = msg[1]
        return self.booted is not None

    @property
    def boot_s(self) -> float | None:
        """Seconds from spawn to the boot report (None until it came)."""
        return None if self.booted is None else self.booted["booted"] - self.booted["spawned"]

    def terminate(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(5.0)
        self.conn.close()


class StageHandle:
    """The node's handle on one worker serving one stage."""

    def __init__(self, worker: _Worker, assignment: StageAssignment, prestarted: bool,
                 assigned_at: float) -> None:
        self._worker, self.assignment = worker, assignment
        self.prestarted, self.assigned_at = prestarted, assigned_at
        self.report: dict | None = None
        self._lock = threading.Lock()
        self.stopped = False

    @property
    def pid(self) -> int:
        return self._worker.pid

    @property
    def stage(self) -> int:
        return self.assignment.plan.spec.index

    @property
    def process(self) -> mp.process.BaseProcess:
        """The worker process (its ``exitcode`` is None while it runs)."""
        return self._worker.proc

    @property
    def boot(self) -> dict | None:
        """The worker's boot report (pid, spawned, booted), once it arrived."""
        return self._worker.booted

    def wait_ready(self, timeout_s: float | None = 600.0) -> dict:
        """Blocks until the stage serves; returns the worker's report (init, load, ready)."""
        with self._lock:
            if self.report is None:
                msg = self._worker.recv(timeout_s, f"loading stage {self.stage}")
                assert msg[0] == "ready", f"worker {self.pid} sent {msg[0]!r} before ready"
                self.report = msg[1]
            return self.report

    def generate(self, requests: list[tuple[str, list[int], SamplingParams]],
                 timeout_s: float | None = 600.0) -> dict:
        """Runs ``requests`` to completion on stage 0; returns outputs and first-token time."""
        if self.stage != 0:
            raise AssignmentError(f"stage {self.stage} takes no requests; send them to stage 0",
                                  "stage")
        self.wait_ready(timeout_s)
        with self._lock:
            self._worker.conn.send(("generate", requests))
            msg = self._worker.recv(timeout_s, "generating")
        assert msg[0] == "result", f"worker {self.pid} answered {msg[0]!r} to generate"
        return msg[1]

    def control(self, msg: tuple) -> None:
        """Sends a serving stage 0's stage server a message (its ``ControlInbox``)."""
        self._worker.conn.send(msg)

    def wait_stopped(self, timeout_s: float | None = 600.0) -> None:
        """Blocks until the worker ends by itself (its stage server's ``serve`` returned); a
        failure there comes back as ``WorkerFailedError`` with the worker's error."""
        self.wait_ready(timeout_s)
        with self._lock:
            msg = self._worker.recv(timeout_s, f"serving stage {self.stage}")
        assert msg[0] == "stopped", f"worker {self.pid} sent {msg[0]!r} instead of stopping"
        self.stopped = True

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stage 0: stops the ring and the process. Other stages stop when the ring does; their
        process is terminated if it has not exited within ``timeout_s``."""
        if self.stopped:
            return
        self.stopped = True
        try:
            with self._lock:
                if self.stage == 0 and self._worker.proc.is_alive():
                    self._worker.conn.send(("stop",))
                self._worker.recv(timeout_s, "stopping")
        except (WorkerDiedError, WorkerTimeoutError, WorkerFailedError, OSError):
            pass  # exited or stuck: terminated below either way
        self._worker.terminate()


class WorkerPool:
    """Pre-started generic workers of one node, and the stages handed to them."""

    def __init__(self, config: WorkerPoolConfig = WorkerPoolConfig()) -> None:
        self.config = config
        self._ctx = worker_context(config)
        self._idle: list[_Worker] = []
        self._handles: list[StageHandle] = []
        self._lock = threading.Lock()
        self._closed = False
        self._count = 0
        # (when, seconds) of the latest boot seen: what a replacement costs
        self._latest_boot: tuple[float, float | None] = (0.0, None)
        # the first workers' boots include the fork server's own start and imports: seconds
        # that no later worker pays
        first_timed = config.method != "forkserver"
        for k in range(config.num_prestarted):
            self._idle.append(self._spawn(config.boot_device(k), timed=first_timed))

    def _spawn(self, device: str, timed: bool = True) -> _Worker:
        parent, child = self._ctx.Pipe()
        self._count += 1
        boot = WorkerBoot(device, self.config.num_threads, time.time(),
                          self.config.preload_modules, self.config.cpu_devices,
                          tuple(os.environ.items()))
        proc = self._ctx.Process(target=worker_main, args=(child, boot), daemon=True,
                                 name=f"hydra-worker-{self.config.node_id}-{self._count}")
        proc.start()
        child.close()
        return _Worker(proc, parent, boot.spawned_at, device, timed)

    def wait_booted(self, timeout_s: float | None = None) -> list[int]:
        """Blocks until every idle worker has booted; returns their pids. A worker that failed
        to boot is dropped and raises ``WorkerStartError``."""
        timeout_s = self.config.boot_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            # the lock is taken per look, not for the whole boot (seconds of imports): the
            # node's heartbeat reads num_booted meanwhile
            with self._lock:
                booting = [w for w in list(self._idle) if not self._poll(w)]
                if not booting:
                    return [w.pid for w in self._idle]
            if time.monotonic() > deadline:
                raise WorkerStartError(f"worker {booting[0].pid} of node {self.config.node_id} "
                                       f"did not boot within {timeout_s} s")
            time.sleep(POLL_S)

    def _poll(self, w: _Worker) -> bool:
        try:
            if not w.poll_boot() and not w.proc.is_alive():
                raise WorkerStartError(f"worker {w.pid} exited (code {w.proc.exitcode}) "
                                       "during boot")
            if w.booted is not None and w.timed and w.booted["booted"] > self._latest_boot[0]:
                self._latest_boot = (w.booted["booted"], w.boot_s)
            return w.booted is not None
        except WorkerStartError:
            self._idle.remove(w)
            w.terminate()
            raise

    def replenish(self) -> int:
        """Starts processes until ``num_prestarted`` workers are idle; returns how many."""
        with self._lock:
            if self._closed:
                raise PoolClosedError(f"worker pool of node {self.config.node_id} is closed")
            missing = max(0, self.config.num_prestarted - len(self._idle))
            wanted = [self.config.boot_device(k) for k in range(self.config.num_prestarted)]
            for w in self._idle:  # start the ones on the devices that have fewest
                if w.device in wanted:
                    wanted.remove(w.device)
            self._idle.extend(self._spawn(d) for d in wanted[:missing])
            return missing

    @property
    def num_idle(self) -> int:
        with self._lock:
            return len(self._idle)

    @property
    def boot_s(self) -> float | None:
        """How long the latest pre-started worker took to boot (None before one did; with the
        fork server, the first ones do not count: their boot includes the server's start):
        what a stage placed here waits when no booted worker is idle (the scheduler plans
        with it, scheduler/state.py)."""
        with self._lock:
            return self._latest_boot[1]

    @property
    def num_booted(self) -> int:
        """Idle workers that have finished booting: stages they take start at once (one that
        died booting is dropped: the heartbeat that asks must not die with it)."""
        with self._lock:
            booted = 0
            for w in list(self._idle):
                try:
                    booted += self._poll(w)
                except WorkerStartError:
                    continue
            return booted

    def assign(self, assignment: StageAssignment) -> StageHandle:
        """Hands ``assignment`` to a free worker (booted ones first), or to a new process."""
        with self._lock:
            if self._closed:
                raise PoolClosedError(f"worker pool of node {self.config.node_id} is closed")
            device = assignment.plan.device
            worker = self._take(device)
            prestarted = worker is not None
            if worker is None:
                worker = self._spawn(device if DeviceName.parse(device).kind == "cuda"
                                     else self.config.device)
            assigned_at = time.time()
            worker.conn.send(("assign", assignment, prestarted, assigned_at))
            handle = StageHandle(worker, assignment, prestarted, assigned_at)
            self._handles.append(handle)
            if prestarted and self.config.refill:
                self._idle.append(self._spawn(worker.device))
            return handle

    def _take(self, device: str) -> _Worker | None:
        for w in list(self._idle):  # drop workers that died while idle
            if not w.proc.is_alive():
                self._idle.remove(w)
                w.terminate()
        fits = [w for w in self._idle if w.can_run(device)]
        booted = [w for w in fits if w.booted is not None or w.poll_boot()]
        pick = booted[0] if booted else (fits[0] if fits else None)
        if pick is not None:
            self._idle.remove(pick)
        return pick

    def close(self, timeout_s: float = 30.0) -> None:
        """Stops every stage (stage 0 first, so rings shut down in order) and idle worker."""
        with self._lock:
            self._closed = True
            handles, idle = list(self._handles), list(self._idle)
            self._handles, self._idle = [], []
        for h in sorted(handles, key=lambda h: h.stage):
            h.stop(timeout_s)
        for w in idle:
            with contextlib.suppress(OSError):  # already gone
                w.conn.send(("stop",))
        for w in idle:
            w.proc.join(timeout_s)
            w.terminate()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
