"""The node agent: registers the node, heartbeats, and runs the worker processes of the stages
the scheduler places here. One per host: ``hydraserve node --node-id ID ...``.

Worker processes are started fresh (never forked from a process that touched CUDA) and get
SIGTERM when the agent dies (PR_SET_PDEATHSIG), so a killed node takes its workers with it and
their unacked requests go back to the queue.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from gpu_runtime.devices import DeviceName, cpu_device_count, cpu_slice, node_device_name
from gpu_runtime.store.link import LinkConfig, NodeLink
from hydraserve.cluster import consolidation
from hydraserve.cluster import service as cluster
from hydraserve.cluster.presence import Presence
from hydraserve.cluster.service import DeviceSpec
from hydraserve.db import make_engine, make_session_factory
from hydraserve.invocations import quarantine
from hydraserve.settings import Settings
from hydraserve.tasks.node import prefill_marker, sequential
from hydraserve.tasks.node.assignment import load_assignment

log = logging.getLogger("hydraserve.node")
HEARTBEAT_S = 2.0
RECONCILE_S = 2.0
PR_SET_PDEATHSIG = 1


def _start_child(cores: list[int] | None) -> None:
    """In a child before exec: dies with this node, and keeps to ``cores`` when given."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if cores:
        os.sched_setaffinity(0, cores)


@dataclass
class NodeAgent:
    settings: Settings
    node_id: str
    devices: list[DeviceSpec]
    link_mbps: float | None = None
    threads_per_worker: int | None = None
    loader: str = "prefetch"  # prefetch: node cache + worker pool; files: a fresh process each
    cache_bytes: int = 256 << 20
    num_prestarted: int = 1
    metrics_port: int | None = None  # serve /metrics here (0: a free port); None: not at all
    children: dict[int, Any] = field(default_factory=dict)  # Popen or PooledChild
    # workers this agent signalled itself: their deaths are no request's doing
    signalled: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _booted: threading.Event = field(default_factory=threading.Event)
    presence: Presence | None = None  # held from start() on (cluster/presence.py)

    def __post_init__(self) -> None:
        self.sessions = make_session_factory(make_engine(self.settings.database_url))
        self.log_dir = os.environ.get("HYDRA_LOG_DIR", "")
        # the host name other nodes reach this one's stage channels at
        self.host = os.environ.get("HYDRA_NODE_HOST", "127.0.0.1")
        self.coldstart = None
        if self.loader == "prefetch":
            from hydraserve.tasks.node.coldstart import ColdStarter

            self.coldstart = ColdStarter(f"{self.settings.queue_prefix}{self.node_id}",
                                         self.cache_bytes, self.link_mbps, self.num_prestarted,
                                         self.threads_per_worker, peer_host=self.host,
                                         devices=tuple(node_device_name(d.kind, d.index)
                                                       for d in self.devices),
                                         node_id=self.node_id)
        # the node's one (emulated) link: the prefetcher's, which sequential-policy downloads
        # share; fresh copies of those downloads, by instance
        self.link = self.coldstart.prefetcher.link if self.coldstart else NodeLink(
            self.node_id, LinkConfig(bandwidth_mb_s=self.link_mbps / 8 if self.link_mbps else None))
        self.scratch = Path(tempfile.gettempdir()) / f"hydra-fresh-{self.settings.queue_prefix}{self.node_id}"
        self.fresh_dirs: dict[int, Path] = {}

    # ---- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self.metrics_port is not None:
            from hydraserve.tasks.node import node_metrics

            self.metrics_port = node_metrics.serve(self, self.metrics_port, self.host)
        # taken before the node shows up: from then on its session ending marks it dead
        self.presence = Presence(self.settings.database_url, self.node_id).start()
        with self.sessions() as s:
            cluster.register(s, self.node_id, self.host, self.link_mbps, self.devices, self.info())
        for target in (self._heartbeat, self._monitor, self._boot_pool):
            threading.Thread(target=target, daemon=True, name=target.__name__).start()
        log.info("node %s up with %d device(s)", self.node_id, len(self.devices))

    def info(self) -> dict:
        cs = self.coldstart
        return {"pid": os.getpid(), "workers": len(self.children), "loader": self.loader,
                "booted": self._booted.is_set(), "cached_stages": cs.cached() if cs else [],
                "idle_workers": cs.pool.num_booted if cs else 0,
                **({"boot_s": round(boot, 3)} if cs and (boot := cs.pool.boot_s) else {}),
                **({"cache_room": cs.prefetcher.cache.room()} if cs else {}),
                **({"peer_port": cs.peer.port} if cs else {}),
                **({"metrics_port": self.metrics_port} if self.metrics_port else {}),
                **({"presence_key": self.presence.key} if self.presence else {}),
                **link_use(self.link)}

    def _boot_pool(self) -> None:
        """Reports the node fully warm once its pre-started workers have booted."""
        if self.coldstart is not None:
            self.coldstart.pool.wait_booted()
        self._booted.set()
        with self.sessions() as s:
            cluster.heartbeat(s, self.node_id, self.info())

    def shutdown(self) -> None:
        self._stop.set()
        with self._lock:
            procs = dict(self.children)
        for instance_id, proc in procs.items():
            self.signalled.add(instance_id)
            proc.terminate()
        for instance_id, proc in procs.items():
            self._reap(instance_id, proc, wait_s=20)
        if self.coldstart is not None:
            self.coldstart.close()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self.sessions() as s:
                    cluster.heartbeat(s, self.node_id, self.info())
            except SQLAlchemyError:  # a database hiccup must not kill the heartbeat thread
                log.exception("heartbeat failed")

    def _monitor(self) -> None:
        """Records worker exits, and kills workers whose instance the scheduler has closed
        (a node taken out and back in must not keep serving with uncounted workers)."""
        last_reconcile = 0.0
        while not self._stop.wait(0.3):
            try:
                with self._lock:
                    exited = [(i, p) for i, p in self.children.items() if p.poll() is not None]
                for instance_id, proc in exited:
                    self._reap(instance_id, proc)
                if time.monotonic() - last_reconcile >= RECONCILE_S:
                    last_reconcile = time.monotonic()
                    self._kill_closed()
            except SQLAlchemyError:  # retried on the next pass; the exit is not forgotten
                log.exception("worker bookkeeping failed")

    def _kill_closed(self) -> None:
        with self._lock:
            ids = list(self.children)
        if not ids:
            return
        with self.sessions() as s:
            closed = cluster.closed_instances(s, ids)
        for instance_id in closed:
            with self._lock:
                proc = self.children.get(instance_id)
            if proc is not None:
                log.warning("instance %s was closed by the scheduler: killing its worker",
                            instance_id)
                self.signalled.add(instance_id)
                proc.kill()

    def _reap(self, instance_id: int, proc: subprocess.Popen, wait_s: float = 0) -> None:
        try:
            code = proc.wait(timeout=wait_s) if wait_s else proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        with self.sessions() as s:  # recorded first: a failure here leaves it for the next pass
            cause = cluster.instance_exited(s, instance_id, code)
        self._suspect(instance_id, cause)
        if proc.pid:
            from hydraserve.tasks.node.node_metrics import worker_exited

            worker_exited(proc.pid)
        with self._lock:
            self.children.pop(instance_id, None)
            self.signalled.discard(instance_id)
        sequential.remove(self.fresh_dirs.pop(instance_id, None))
        if self.coldstart is not None:
            self.coldstart.release_rest(instance_id)
        log.info("instance %s exited with %s", instance_id, code)

    def _suspect(self, instance_id: int, cause: str | None) -> None:
        """A stage-0 worker that died on its own: the requests it was prefilling are the
        suspects (invocations/quarantine.py). Its marker file is removed in any case."""
        suspects = prefill_marker.take(
            prefill_marker.marker_path(self.settings.queue_prefix, instance_id))
        if not suspects or cause is None or instance_id in self.signalled:
            return
        with self.sessions() as s:
            held = quarantine.worker_died(s, suspects, instance_id, cause)
        log.warning("instance %s died while prefilling %d request(s); quarantined: %s",
                    instance_id, len(suspects), ", ".join(held) or "none (each is prefilled "
                    "alone from now on)")

    # ---- tasks ----------------------------------------------------------------------------

    def start_stage(self, instance_id: int) -> None:
        """Starts the worker process of one stage, once (a redelivered task is a no-op)."""
        with self._lock:
            if instance_id in self.children:
                return
        with self.sessions() as s:
            if cluster.instance_status(s, instance_id) != "starting":
                return
            a = load_assignment(s, instance_id)
        try:
            proc: Any = (self._start_sequential(a) if a.policy == "sequential"
                         else self.coldstart.launch(self.sessions, a) if self.coldstart
                         else self._spawn(a))
        except Exception as exc:  # noqa: BLE001 - any start failure is recorded for a re-plan
            log.warning("instance %s could not start: %s", instance_id, exc)
            with self.sessions() as s:
                cluster.fail_instance(s, instance_id, f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            self.children[instance_id] = proc
        with self.sessions() as s:
            cluster.set_pid(s, instance_id, proc.pid)
        log.info("instance %s: stage %d/%d started as pid %d", instance_id, a.stage_index, a.pp,
                 proc.pid)

    def _start_sequential(self, a) -> subprocess.Popen:
        """The sequential policy: the whole checkpoint over the link first, then a fresh
        worker that loads it from the files (tasks/node/sequential.py)."""
        dest, phases = sequential.download(a, self.link, self.scratch)
        self.fresh_dirs[a.instance_id] = dest
        with self.sessions() as s:
            cluster.add_timeline(s, a.instance_id, phases | {"node": self.node_id})
            s.commit()
        return self._spawn(a, {"HYDRA_MODEL_DIR": str(dest)})

    def _spawn(self, a, env: dict[str, str] | None = None) -> subprocess.Popen:
        log_path = os.path.join(self.log_dir, f"instance-{a.instance_id}.log") if self.log_dir \
            else os.devnull
        cores = self._cores_of(a.device)
        with open(log_path, "ab") as out:  # the child keeps its own descriptor
            return subprocess.Popen(self._argv(a), stdout=out, stderr=subprocess.STDOUT,
                                    env=os.environ | (env or {}), stdin=subprocess.DEVNULL,
                                    preexec_fn=lambda: _start_child(cores))

    def _cores_of(self, device: str) -> list[int] | None:
        """The cores of a CPU device of this node (None: every core, or a CUDA device):
        the files loader's processes (a baseline, CPU only) keep to their device's slice."""
        name = DeviceName.parse(device)
        cpus = cpu_device_count(node_device_name(d.kind, d.index) for d in self.devices)
        if name.kind != "cpu" or name.index is None or cpus < 2:
            return None
        return cpu_slice(name.index, cpus)

    def _argv(self, a) -> list[str]:
        threads = ["--threads", str(self.threads_per_worker)] if self.threads_per_worker else []
        if a.stage_index == 0:
            return [sys.executable, "-m", "hydraserve.tasks.node.request_loop", "--instance-id",
                    str(a.instance_id), *threads]
        return [sys.executable, "-m", "gpu_runtime.pipeline", "--model", a.model_dir(),
                "--pp", str(a.pp), "--stage", str(a.stage_index),
                "--addresses", ",".join(a.addresses), *threads]

    def consolidate(self, instance_id: int) -> None:
        """The scheduler's go for a ready group whose stage 0 runs here: fetch the rest of the
        model into the node cache (background priority) and hand it to the worker, on a
        thread. A node without a cache and worker pool cannot: the group stays a pipeline."""
        with self._lock:
            proc = self.children.get(instance_id)
        from hydraserve.tasks.node.coldstart import PooledChild

        if self.coldstart is None or not isinstance(proc, PooledChild):
            why = ("this node loads from files (--loader files): consolidation needs the node "
                   "cache" if self.coldstart is None else "its worker is not running here")
            with self.sessions() as s:
                a = load_assignment(s, instance_id)
                consolidation.give_up(s, a.plan_id, why)
            return
        threading.Thread(target=self._consolidate, args=(instance_id, proc), daemon=True,
                         name=f"consolidate-{instance_id}").start()

    def _consolidate(self, instance_id: int, proc) -> None:
        assert self.coldstart is not None
        try:
            self.coldstart.consolidate(self.sessions, instance_id, proc)
        except Exception as exc:  # noqa: BLE001 - a failed hand-over leaves the pipeline serving
            log.exception("instance %s: consolidation could not start", instance_id)
            with self.sessions() as s:
                a = load_assignment(s, instance_id)
            self.coldstart.fail_consolidation(self.sessions, a, None, f"the hand-over to the "
                                              f"worker failed: {type(exc).__name__}: {exc}")

    def stop_stage(self, instance_id: int, kill: bool = False) -> None:
        """Signals the worker; with no worker here (never started, or gone) the instance is
        closed at once, so it does not stay ``stopping`` holding memory and billing."""
        with self._lock:
            proc = self.children.get(instance_id)
        if proc is not None:
            self.signalled.add(instance_id)
            proc.kill() if kill else proc.terminate()
            return
        with self.sessions() as s:
            cluster.instance_exited(s, instance_id, 0)


# a fetch smaller than this says more about its fixed costs than about the link's bandwidth
BANDWIDTH_SAMPLE_BYTES = 8 << 20


def link_use(link) -> dict:
    """What the node's link has carried: bytes since start, its last fetches' rate, and the
    bandwidth the planner reads (the rate of its last fetches big enough to show it)."""
    rate, bandwidth = link.recent_rate(), link.recent_rate(min_bytes=BANDWIDTH_SAMPLE_BYTES)
    return {"link_bytes": link.total_bytes,
            "link_mb_per_s": round(rate / 1e6, 2) if rate is not None else None,
            "link_bandwidth_mb_per_s": round(bandwidth / 1e6, 2) if bandwidth else None}


_agent: NodeAgent | None = None


def set_agent(agent: NodeAgent) -> None:
    global _agent
    _agent = agent


def agent() -> NodeAgent:
    assert _agent is not None, "node tasks run only inside a node agent (hydraserve node)"
    return _agent

