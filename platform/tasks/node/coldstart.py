"""The node agent's cold-start path: fetch the stage into the node cache through the node's
(emulated) link while a pre-started worker takes the stage and initialises; the worker loads
each tensor zero-copy as its bytes arrive (gpu_runtime.coldstart, docs/loading.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import replace

from sqlalchemy.orm import Session, sessionmaker

from gpu_runtime.coldstart import (
    LaunchedStage,
    PoolClosedError,
    StagePlan,
    WorkerPool,
    WorkerPoolConfig,
    launch_stage,
    plan_group,
)
from gpu_runtime.prefetch import PrefetchConfig, Prefetcher
from gpu_runtime.prefetch.peer import PeerServer
from gpu_runtime.store import LinkConfig
from hydraserve.cluster import consolidation
from hydraserve.cluster import service as cluster
from hydraserve.tasks.node.assignment import (
    Assignment,
    cache_model,
    load_assignment,
    model_index,
)
from hydraserve.tasks.node.request_loop import RequestLoop

log = logging.getLogger("hydraserve.node")
CACHE_MODEL = re.compile(r"^m(\d+)-")  # cache names made by assignment.cache_model
CACHE_STAGE = re.compile(r"^pp(\d+)-s(\d+)$")  # StagePlan.cache_stage
READY_TIMEOUT_S = 900.0
# A replacement pre-started worker boots (imports torch: seconds of CPU) this long after the
# worker it replaces has its stage up, so that boot does not compete with the cold start's
# first forward pass on the node's CPUs (4 nodes booting at once doubled a pp=4 start here).
REFILL_AFTER_S = 3.0


class PooledChild:
    """A pool worker serving one stage, with the part of Popen's interface the agent uses."""

    def __init__(self, launched: LaunchedStage) -> None:
        self.launched = launched
        self.process = launched.handle.process
        self.pid = launched.handle.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
        return self.process.exitcode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):  # it exited since the check
                os.kill(self.pid, sig)


# the node's side of a stage's timeline (the worker writes its own)
FETCH_PHASES = ("fetch_start", "fetch_end", "fetch_bytes", "cache_hit")
NODE_PHASES = ("plan", *FETCH_PHASES, "prestarted", "node")


class ColdStarter:
    """One node's prefetcher (shared-memory cache, link cap) and pool of generic workers."""

    def __init__(self, cache_name: str, cache_bytes: int, link_mbps: float | None,
                 num_prestarted: int, threads: int | None, devices: tuple[str, ...] = (),
                 peer_host: str = "127.0.0.1", node_id: str = "") -> None:
        link = LinkConfig(bandwidth_mb_s=link_mbps / 8 if link_mbps else None)
        self.prefetcher = Prefetcher(PrefetchConfig(node_id=cache_name, pool_bytes=cache_bytes,
                                                    link=link))
        # refilled by _follow once a taken worker's stage is up, not at once (see REFILL_AFTER_S)
        self.pool = WorkerPool(WorkerPoolConfig(node_id=cache_name, num_prestarted=num_prestarted,
                                                devices=devices, num_threads=threads,
                                                preload=(RequestLoop,), refill=False))
        self.threads = threads
        self.rest: dict[int, list] = {}  # instance -> the fetch jobs of its consolidation
        # the node cache, served to peers by byte range (their consolidations read it)
        self.peer = PeerServer(self.prefetcher, peer_host).start()
        self.node_id = node_id  # the cluster's name for this node

    def launch(self, sessions: sessionmaker, a: Assignment) -> PooledChild:
        with sessions() as s:
            plan = stage_plan(s, a, self.threads)
        launched = launch_stage(self.prefetcher, self.pool, plan)
        threading.Thread(target=self._follow, args=(sessions, a.instance_id, launched),
                         daemon=True, name=f"follow-{a.instance_id}").start()
        return PooledChild(launched)

    def _follow(self, sessions: sessionmaker, instance_id: int, launched: LaunchedStage) -> None:
        """Records the node's side of the timeline once the stage is up, then unpins the
        buffer (the worker holds its own mapping); a failed start is recorded with its cause."""
        try:
            if launched.wait_fetched(READY_TIMEOUT_S) is not None:  # usually before the load
                self._record(sessions, instance_id, launched, FETCH_PHASES)  # ends: the first
            launched.wait_ready(READY_TIMEOUT_S)  # claims see the fetch (ledger.begin)
        except Exception as exc:  # noqa: BLE001 - any start failure is recorded, then the worker exits
            log.warning("instance %s failed to start: %s", instance_id, exc)
            with sessions() as s:
                cluster.fail_start(s, instance_id, f"{type(exc).__name__}: {exc}")
                s.commit()
            launched.handle.stop(5)
            self._refill(0)
            return
        finally:
            launched.job.release()
        threading.Thread(target=self._refill, args=(REFILL_AFTER_S,), daemon=True,
                         name=f"refill-{instance_id}").start()
        self._record(sessions, instance_id, launched, NODE_PHASES)
        report = launched.handle.report or {}
        with sessions() as s:  # where the worker runs, what its share holds (the admin view)
            cluster.add_timeline(s, instance_id, {"device": report.get("device"),
                                                  "memory": report.get("memory")})
            s.commit()

    @staticmethod
    def _record(sessions: sessionmaker, instance_id: int, launched: LaunchedStage,
                names: tuple[str, ...]) -> None:
        t = launched.timeline()
        with sessions() as s:
            cluster.add_timeline(s, instance_id, {n: getattr(t, n) for n in names})
            s.commit()

    def _refill(self, delay_s: float) -> None:
        time.sleep(delay_s)
        with contextlib.suppress(PoolClosedError):  # the node is shutting down
            self.pool.replenish()

    def consolidate(self, sessions: sessionmaker, instance_id: int, child: PooledChild) -> None:
        """Fetches the stages a consolidating stage 0 (or a later full-share stage that will
        become a replica) lacks into this node's cache, at background priority (a cached stage
        is a hit: no network), then hands them to the worker. A fetch that fails leaves the group a pipeline, with the cause recorded.
        Blocks until handed over (run it on a thread)."""
        with sessions() as s:
            a = load_assignment(s, instance_id)
            index = model_index(s, a.model_id)
        plans = plan_group(cache_model(a), index, a.pp, kv_cache_bytes=a.kv_cache_bytes,
                           addresses=a.addresses, kv_whole_model=True)
        whole = plan_group(cache_model(a), index, 1, kv_cache_bytes=a.kv_cache_bytes)[0]
        started = time.time()
        missing = [p for p in plans if p.spec.index != a.stage_index]
        with sessions() as s:
            sources = [self.source_of(s, a, p) for p in missing]
        jobs = [self.prefetcher.prefetch(p.model, p.cache_stage, uri, p.entries,
                                         background=True)
                for p, (_, uri) in zip(missing, sources, strict=True)]
        self.rest[instance_id] = jobs  # pinned until the worker exits (release_rest)
        try:
            for i, p in enumerate(missing):
                jobs[i], sources[i] = self._fetched(p, jobs[i], sources[i], instance_id)
        except Exception as exc:  # noqa: BLE001 - the group stays a pipeline, with the cause
            log.warning("instance %s: the rest of the model could not be fetched: %s",
                        instance_id, exc)
            self.fail_consolidation(sessions, a, child, f"fetching the rest of the model "
                                    f"failed: {type(exc).__name__}: {exc}")
            self.release_rest(instance_id)
            return
        fetch = {"start": started, "end": time.time(),
                 "bytes": sum(j.layout.fetch_bytes for j in jobs if not j.cache_hit),
                 "cache_hits": sum(j.cache_hit for j in jobs),
                 "node": self.prefetcher.config.node_id,
                 "sources": {p.cache_stage: "cache" if j.cache_hit else src
                             for p, j, (src, _) in zip(missing, jobs, sources, strict=True)}}
        with sessions() as s:  # one key per stage: several nodes fetch for one group
            consolidation.add_stats(s, a.plan_id, {f"fetch_s{a.stage_index}": fetch})
        time.sleep(fault_hold_s())
        child.launched.handle.control(("consolidate", {
            "spec": whole.spec, "sources": [(j.handle, j.layout) for j in jobs]}))

    def _fetched(self, plan: StagePlan, job, source: tuple[str, str],
                 instance_id: int) -> tuple:
        """(job, source) once ``job`` completed; a peer that failed is replaced by the store
        (which holds every byte); any other failure is raised."""
        try:
            job.wait(READY_TIMEOUT_S)
            return job, source
        except Exception as exc:  # noqa: BLE001 - re-raised unless a peer failed
            if not source[0].startswith("peer:"):
                raise
            log.warning("instance %s: stage %s from %s failed (%s); from the store",
                        instance_id, plan.cache_stage, source[0], exc)
        job.release()
        job = self.prefetcher.prefetch(plan.model, plan.cache_stage, plan.uri, plan.entries,
                                       background=True)
        job.wait(READY_TIMEOUT_S)
        return job, ("store", plan.uri)

    def source_of(self, session: Session, a: Assignment, plan: StagePlan) -> tuple[str, str]:
        """(where from, URI) of a stage this node lacks: its own cache (the prefetch is a hit),
        else the cache of the node that runs that stage of this group, else of another peer
        whose heartbeat reports it, else the store."""
        if self.prefetcher.holds(plan.model, plan.cache_stage, plan.entries):
            return "cache", plan.uri
        holder = cluster.stage_holder(session, a.group[plan.spec.index], self.node_id)
        peers = [holder] if holder else cluster.cache_peers(
            session, a.model_id, a.pp, plan.spec.index, self.node_id)
        for node_id, address, port in peers:
            return f"peer:{node_id}", f"http://{address}:{port}/{plan.model}"
        return "store", plan.uri

    @staticmethod
    def fail_consolidation(sessions: sessionmaker, a: Assignment, child: PooledChild | None,
                           cause: str) -> None:
        """Stage 0: the group stays a pipeline, with the cause. A later stage: no replica
        (the cause is kept in the plan's record; its worker ends with the ring)."""
        with sessions() as s:
            if a.stage_index == 0:
                consolidation.give_up(s, a.plan_id, cause)
                return
            consolidation.add_stats(s, a.plan_id, {f"replica_s{a.stage_index}_error": cause})
        if child is not None:
            with contextlib.suppress(OSError):  # the worker is gone already
                child.launched.handle.control(("no_replica", cause))

    def release_rest(self, instance_id: int) -> None:
        """Unpins what was fetched for an instance's consolidation (its worker has exited, or
        holds its own mapping)."""
        for job in self.rest.pop(instance_id, []):
            job.release()

    def cached(self) -> list[list[int]]:
        """[model_id, pp, stage] of every complete stage in the node cache, for the heartbeat
        (the planner restarts a pipeline where its stages already are)."""
        out = []
        for e in self.prefetcher.cache.entries():
            model, stage = CACHE_MODEL.match(e["model"]), CACHE_STAGE.match(e["stage"])
            if e["state"] == "complete" and model and stage:
                out.append([int(model[1]), int(stage[1]), int(stage[2])])
        return sorted(out)

    def close(self) -> None:
        self.pool.close()
        self.peer.close()
        self.prefetcher.close()


def fault_hold_s() -> float:
    """Fault injection for tests (0 unless set): ``HYDRA_FAULT_CONSOLIDATION_HOLD_S`` holds the
    rest of the model back this long after its fetch, so a test can break a group while it
    is consolidating."""
    return float(os.environ.get("HYDRA_FAULT_CONSOLIDATION_HOLD_S") or 0)


def stage_plan(session: Session, a: Assignment, threads: int | None) -> StagePlan:
    """The data plane's plan for this instance's stage; stage 0 hands over to the platform's
    request loop once loaded."""
    plans = plan_group(cache_model(a), model_index(session, a.model_id),
                       a.pp, kv_cache_bytes=a.kv_cache_bytes, num_threads=threads,
                       addresses=a.addresses if a.pp > 1 else (), plan_time=a.plan_time,
                       kv_whole_model=a.consolidates)
    plan = replace(plans[a.stage_index], device=a.device, memory_bytes=a.memory_bytes,
                   cap_memory=a.workspace_reserved)
    if a.stage_index == 0:
        plan = replace(plan, server=RequestLoop(a.instance_id))
    elif a.consolidates and a.memory_bytes >= a.model_bytes:  # a replica once consolidated
        plan = replace(plan, replica=RequestLoop(a.instance_id, replica=True))
    return plan
