"""The node's part of a cold start: start the prefetch, hand the stage to a worker at once,
and stamp the fetch phases; plus a one-machine helper that launches a whole group.

A node agent calls ``launch_stage(prefetcher, pool, plan)`` for the stage planned on its node;
the fetch and the worker's boot or init then run together. ``ColdStartGroup`` does that for
every stage of a plan across several emulated nodes (tests, benchmarks, a single host).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from gpu_runtime.coldstart.errors import AssignmentError
from gpu_runtime.coldstart.plan import StageAssignment, StagePlan
from gpu_runtime.coldstart.pool import StageHandle, WorkerPool
from gpu_runtime.coldstart.timeline import ColdStartTimeline, StageTimeline
from gpu_runtime.prefetch import FetchJob, Prefetcher
from gpu_runtime.sampling import SamplingParams


class LaunchedStage:
    """One stage on one node: its prefetch job, its worker, and the node-side timestamps."""

    def __init__(self, plan: StagePlan, node: str, job: FetchJob, handle: StageHandle,
                 fetch_start: float) -> None:
        self.plan, self.node, self.job, self.handle = plan, node, job, handle
        self.fetch_start = fetch_start
        self.fetch_end: float | None = None
        self.fetch_error: BaseException | None = None
        self._watch = threading.Thread(target=self._watch_fetch, daemon=True,
                                       name=f"fetch-watch-{plan.cache_stage}")
        self._watch.start()

    def _watch_fetch(self) -> None:
        try:
            self.job.wait()
            self.fetch_end = self.fetch_start if self.job.cache_hit else time.time()
        except Exception as exc:  # noqa: BLE001 - the worker raises the same typed error
            self.fetch_error = exc

    def wait_fetched(self, timeout_s: float | None = 600.0) -> float | None:
        """Waits for the fetch to end; its end stamp (None when it failed or is still on)."""
        self._watch.join(timeout_s)
        return self.fetch_end

    def wait_ready(self, timeout_s: float | None = 600.0) -> dict:
        """The worker's ready report; also waits for the fetch-end stamp."""
        report = self.handle.wait_ready(timeout_s)
        self._watch.join(timeout_s)
        return report

    def timeline(self, first_token: float | None = None) -> StageTimeline:
        """This stage's phases, from the node's stamps and the worker's report."""
        r = self.handle.report or {}
        return StageTimeline(
            stage=self.plan.spec.index, node=self.node, plan=self.plan.plan_time,
            fetch_start=self.fetch_start, fetch_end=self.fetch_end,
            init_start=r.get("init_start"), init_end=r.get("init_end"),
            load_end=r.get("load_end"), ready=r.get("ready"), first_token=first_token,
            fetch_bytes=self.job.layout.fetch_bytes, cache_hit=self.job.cache_hit,
            prestarted=self.handle.prestarted)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.handle.stop(timeout_s)
        self.job.release()


def start_fetch(prefetcher: Prefetcher, plan: StagePlan) -> tuple[FetchJob, float]:
    """Starts fetching ``plan``'s stage into the node cache; returns the job and its start."""
    fetch_start = time.time()
    return prefetcher.prefetch(plan.model, plan.cache_stage, plan.uri, plan.entries), fetch_start


def launch_stage(prefetcher: Prefetcher, pool: WorkerPool, plan: StagePlan,
                 fetch: tuple[FetchJob, float] | None = None) -> LaunchedStage:
    """Starts fetching ``plan``'s stage on this node (unless ``fetch`` says it was started by
    ``start_fetch``) and hands it to a worker right away."""
    job, fetch_start = fetch or start_fetch(prefetcher, plan)
    node = prefetcher.config.node_id
    try:
        handle = pool.assign(StageAssignment(plan, node, job.handle, job.layout))
    except BaseException:
        job.release()
        raise
    return LaunchedStage(plan, node, job, handle, fetch_start)


class ColdStartGroup:
    """Every stage of one cold start, stage ``i`` on node ``nodes[i]`` (one machine)."""

    def __init__(self, nodes: Sequence[tuple[Prefetcher, WorkerPool]],
                 plans: Sequence[StagePlan]) -> None:
        if len(nodes) != len(plans):
            raise AssignmentError(f"{len(plans)} stages need {len(plans)} nodes, got "
                                  f"{len(nodes)}", "nodes")
        self.plans = list(plans)
        self.stages: list[LaunchedStage] = []
        # every node starts its download first, as separate nodes would at the same moment;
        # handing stages to workers (pickling, pipes) comes second
        fetches = [start_fetch(pf, plan) for (pf, _), plan in zip(nodes, plans, strict=True)]
        try:
            for (prefetcher, pool), plan, fetch in zip(nodes, plans, fetches, strict=True):
                self.stages.append(launch_stage(prefetcher, pool, plan, fetch))
        except BaseException:
            for job, _ in fetches[len(self.stages):]:
                job.release()
            self.stop(5.0)
            raise
        self.first_token: float | None = None

    def wait_ready(self, timeout_s: float | None = 600.0) -> list[dict]:
        """Reports of every stage once the whole ring serves (stage 0 is ready last)."""
        return [s.wait_ready(timeout_s) for s in self.stages]

    def generate(self, requests: list[tuple[str, list[int], SamplingParams]],
                 timeout_s: float | None = 600.0) -> dict:
        """Runs requests on stage 0; the first call stamps the group's first token."""
        result = self.stages[0].handle.generate(requests, timeout_s)
        if self.first_token is None:
            self.first_token = result["first_token"]
        return result

    def timeline(self) -> ColdStartTimeline:
        plan = self.plans[0]
        return ColdStartTimeline(plan.model, plan.pp,
                                 tuple(s.timeline(self.first_token) for s in self.stages))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops stage 0 first (it stops the ring), then the others."""
        for s in self.stages:
            s.stop(timeout_s)
