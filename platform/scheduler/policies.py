"""How the scheduler starts functions, chosen per cluster (``HYDRA_SCHEDULER_POLICY``) and
recorded in each plan, so a workload can be replayed against the platform and its baselines
on the same cluster (bench/replay.py):

- ``hydra``: the planner as designed: pipelines of up to 4 stages, each node fetching one,
  cache locality, pre-started workers loading while the bytes arrive;
- ``pp1``: ServerlessLLM-like: the node cache, cache locality and pre-started workers, but
  one whole-model instance per cold start (pp = 1);
- ``sequential``: serverless-vLLM-like: every cold start downloads the whole checkpoint over
  the node's link into a fresh directory, then a fresh process loads it from the files, then
  serves (no node cache, no pre-started worker, nothing overlapped; tasks/node/agent.py).
"""

from __future__ import annotations

from dataclasses import replace

from hydraserve.scheduler.planner import PlannerConfig


def planner_config(policy: str, cfg: PlannerConfig) -> PlannerConfig:
    """The planner's configuration under ``policy``."""
    if policy == "hydra":
        return cfg
    if policy == "pp1":
        return replace(cfg, max_pp=1)
    if policy == "sequential":
        return replace(cfg, max_pp=1, use_cache=False, prestarted=False)
    raise ValueError(f"unknown scheduler policy {policy!r}")
