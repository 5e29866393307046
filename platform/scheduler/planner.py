"""The cold-start planner: pipeline size, per-stage memory share and node placement.

A pure function of the cluster snapshot, the function's SLOs and an estimate of the model's
speed (``actions.Profile``; see docs/planner.md). For pipeline size ``pp`` and ``n_full`` workers holding a full memory share:

    inc       = (pp - n_full) + n_full / pp
    TPOT_pred = T * inc + hop * (pp - 1)
    TTFT_pred = max over the chosen nodes of max(M / (pp * BW_n), boot_n) + P * inc + w + init

where ``BW_n`` is node n's link share once the new fetch joins and ``boot_n`` the wait for a
worker there (0 while a pre-started one is booted and idle, else about one worker boot: the
fetch overlaps it). Nodes are taken in the order a stage placed there could start. The
smallest feasible ``pp`` wins; among plans of one size the one with the fewest full shares
(least memory-time). Cached models are placed where the bytes
already are. A model that fits on no single device gets a pipeline of part shares only. When no
plan gives as many full shares as demand asks for, the first feasible one is used; when none
with a full share meets the SLOs: a cached start that misses them, then a pipeline of part
shares that meets them, then pp = 1 on the best-bandwidth node that fits and then the smallest
part-share pipeline that fits (both ``slo_met=False``); with no node that fits at all, ``None``
(the caller waits and retries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from gpu_runtime.limits import MAX_PP
from hydraserve.scheduler.network import Link, Reservation


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """The planner's constants, kept in one place. They are fixed defaults for now; measuring
    them on the cluster is not done yet (docs/planner.md)."""

    init_overhead_s: float = 1.0  # worker start not hidden behind the fetch
    hop_s: float = 0.002  # per-token cost of one pipeline hop
    kv_reserve_fraction: float = 0.25  # KV cache reserve, as a fraction of model bytes
    max_pp: int = MAX_PP
    use_cache: bool = True  # restart where the node caches hold the model (no fetch)
    # stages run on the nodes' pre-started workers, so a node whose booted ones are taken
    # makes a stage wait for a boot (off: every start is a fresh process, alike everywhere)
    prestarted: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.max_pp <= MAX_PP:
            raise ValueError(f"max_pp must be 1..{MAX_PP}, got {self.max_pp}")
        for name in ("init_overhead_s", "hop_s", "kv_reserve_fraction"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# a plan whose stages wait for a boot at most this much longer than their fetch starts "at
# once": not worth a fetch elsewhere or fewer full shares (a worker forked from the node's
# fork server boots in tens of milliseconds; one that imports torch itself, in seconds)
BOOT_WAIT_TOLERANCE_S = 0.5

CACHE_ALIGN = 1 << 20  # a node cache buffer: a header page, then the data, in whole MiB
CACHE_HEADER = 4096  # (gpu_runtime/prefetch/pool.py, extent_bytes)


def cache_extent(data_bytes: float) -> int:
    """The bytes a buffer of ``data_bytes`` takes in a node cache."""
    return math.ceil((data_bytes + CACHE_HEADER) / CACHE_ALIGN) * CACHE_ALIGN


@dataclass(frozen=True, slots=True)
class Device:
    device_id: int
    free_bytes: int
    num_workers: int = 0


@dataclass(frozen=True, slots=True)
class NodeState:
    node_id: str
    link: Link
    devices: tuple[Device, ...]
    # stages in the node cache: (model_id, pp, stage index), a whole model being (id, 1, 0); a
    # pipeline whose every stage is cached on some node restarts there with no fetch at all
    cached_stages: frozenset[tuple[int, int, int]] = frozenset()
    # the largest buffer its node cache could give a new stage now, evicting what is idle
    # (None: not known, e.g. a node without a cache): a fetch that does not fit is not planned
    # there, rather than started to fail with CacheFullError
    cache_room: int | None = None
    # how long a stage placed here now would wait for a worker: 0 while a pre-started one is
    # booted and idle, else about one worker boot (scheduler/state.py boot_wait_s)
    boot_wait_s: float = 0.0

    def fetch_ready_s(self, stage_bytes: float) -> float:
        """When a fetched stage of ``stage_bytes`` is in place and has a worker here: its fetch
        at the link's share with one more, overlapped with the wait for a worker."""
        return max(stage_bytes / self.link.share_with_one_more(), self.boot_wait_s)

    def holds(self, model_id: int, pp: int, stage: int) -> bool:
        return (model_id, pp, stage) in self.cached_stages

    def can_cache(self, req: Request, pp: int) -> bool:
        """Whether a stage of a ``pp``-stage pipeline of ``req``'s model fits the node cache:
        stages are split by layers, so one may hold more than ``M / pp`` (the embedding, the
        head): a stage of a pipeline gets half as much again of room."""
        if self.cache_room is None:
            return True
        stage = req.model_bytes if pp == 1 else 1.5 * req.model_bytes / pp
        return self.cache_room >= cache_extent(stage)


@dataclass(frozen=True, slots=True)
class Request:
    """One cold start to plan."""

    model_id: int
    model_bytes: int
    ttft_slo_s: float
    tpot_slo_s: float
    tpot_s: float  # profiled standalone time per output token (T)
    prefill_s: float  # profiled standalone prefill time (P)
    waited_s: float = 0.0  # how long the oldest waiting request has waited (w)
    demand: int = 1  # instances the queue asks for
    num_layers: int = MAX_PP  # a pipeline has at most one stage per decoder layer
    kv_block_bytes: int = 0  # one block of KV over every layer: a share holds at least one

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers {self.num_layers} must be positive")
        if self.model_bytes <= 0 or self.demand < 1:
            raise ValueError(f"model_bytes {self.model_bytes} and demand {self.demand} must be positive")


@dataclass(frozen=True, slots=True)
class StagePlacement:
    stage: int
    node_id: str
    device_id: int
    memory_bytes: int
    full_share: bool
    fetch_bytes: int  # 0 when the node's cache already holds the model


@dataclass(frozen=True, slots=True)
class Plan:
    pp: int
    stages: tuple[StagePlacement, ...]
    predicted_ttft_s: float
    predicted_tpot_s: float
    slo_met: bool
    reason: str
    reservations: dict[str, Reservation] = field(default_factory=dict)
    # how much longer than its fetch the plan waits for a worker to boot (0: hidden by it)
    boot_wait_s: float = 0.0

    @property
    def waits_for_boot(self) -> bool:
        return self.boot_wait_s > BOOT_WAIT_TOLERANCE_S

    @property
    def num_full(self) -> int:
        return sum(s.full_share for s in self.stages)


def memory_need(req: Request, cfg: PlannerConfig, pp: int, full: bool) -> int:
    """A stage's share: its weights (a full share: the whole model) and the KV reserve, and
    never less than the weights and one block of KV on its layers (a share that small is
    refused here, not at load)."""
    total = req.model_bytes * (1 + cfg.kv_reserve_fraction)
    if full:
        return math.ceil(max(total, req.model_bytes + req.kv_block_bytes))
    layers = math.ceil(req.num_layers / pp)  # the stage with the most layers
    block = req.kv_block_bytes * layers / req.num_layers
    return math.ceil(max(total / pp, req.model_bytes / pp + block))


def pick_device(node: NodeState, need: int) -> Device | None:
    """Prefer a device with no co-located worker, then the best fit."""
    fits = [d for d in node.devices if d.free_bytes >= need]
    return min(fits, key=lambda d: (d.num_workers > 0, d.free_bytes - need), default=None)


def largest_pp(req: Request, cfg: PlannerConfig) -> int:
    """The largest pipeline to consider: the configured cap, and no more stages than layers
    (a pp=3 plan of a 2-layer model fails on every node that gets it)."""
    return min(cfg.max_pp, req.num_layers)


def inflation(pp: int, n_full: int) -> float:
    return (pp - n_full) + n_full / pp


def plan_cold_start(req: Request, nodes: list[NodeState], cfg: PlannerConfig = PlannerConfig()) -> Plan | None:
    """Chooses how to start one more instance of ``req``'s model; see the module docstring.
    A plan that would wait for a worker to boot (more than ``BOOT_WAIT_TOLERANCE_S`` past its
    fetch) is taken only when none that meets the SLOs starts without one: fewer full shares
    now beat more of them a boot later (the scheduler scales out again if the demand stays)."""
    if not cfg.prestarted:
        nodes = [replace(n, boot_wait_s=0.0) for n in nodes]
    cached = _plan_from_cache(req, nodes, cfg) if cfg.use_cache else None
    if cached is not None and cached.slo_met and not cached.waits_for_boot:
        return cached
    open_nodes = [n for n in nodes if n.link.admits_one_more()]
    wanted = min(req.demand, largest_pp(req, cfg))  # full shares become replicas
    feasible = [plan for pp in range(1, largest_pp(req, cfg) + 1)
                for n_full in range(min(pp, req.demand), pp + 1)
                if (plan := _try(req, open_nodes, cfg, pp, n_full)) is not None]
    at_once = [p for p in feasible if not p.waits_for_boot]
    # the smallest pipeline with as many full shares as demand asks for, else the first
    # feasible one (fewer instances than demand asks for)
    pick = _first_with(at_once, wanted) or (cached if cached is not None and cached.slo_met
                                            else _first_with(feasible, wanted))
    return pick or cached or _part_shares_only(req, open_nodes, cfg) or _fallback(
        req, open_nodes, cfg)


def _first_with(plans: list[Plan], wanted: int) -> Plan | None:
    return next((p for p in plans if p.num_full >= wanted), plans[0] if plans else None)


def _part_shares_only(req: Request, nodes: list[NodeState], cfg: PlannerConfig) -> Plan | None:
    """A model no single device holds can still be served by a pipeline of part shares; it
    could never consolidate (it has no full-share worker to become a replica)."""
    for pp in range(2, largest_pp(req, cfg) + 1):
        plan = _try(req, nodes, cfg, pp, 0)
        if plan is not None:
            return plan
    return None


def _try(req: Request, nodes: list[NodeState], cfg: PlannerConfig, pp: int,
         n_full: int, enforce_slo: bool = True) -> Plan | None:
    inc = inflation(pp, n_full)
    tpot = req.tpot_s * inc + cfg.hop_s * (pp - 1)
    if enforce_slo and tpot > req.tpot_slo_s:
        return None
    stage_bytes = req.model_bytes / pp
    soonest = sorted(nodes, key=lambda n: n.fetch_ready_s(stage_bytes))
    full_need, part_need = memory_need(req, cfg, pp, True), memory_need(req, cfg, pp, False)
    soonest = [n for n in soonest if n.can_cache(req, pp)]
    full_nodes = [n for n in soonest if pick_device(n, full_need)][:n_full]
    if len(full_nodes) < n_full:
        return None
    rest = [n for n in soonest if n not in full_nodes and pick_device(n, part_need)]
    chosen = full_nodes + rest[: pp - n_full]
    if len(chosen) < pp:
        return None
    bw = min(n.link.share_with_one_more() for n in chosen)
    ready = max(n.fetch_ready_s(stage_bytes) for n in chosen)
    deadline = req.ttft_slo_s - req.waited_s - cfg.init_overhead_s
    ttft = ready + req.prefill_s * inc + req.waited_s + cfg.init_overhead_s
    met = ttft <= req.ttft_slo_s and ready <= deadline and tpot <= req.tpot_slo_s
    if enforce_slo and not met:
        return None
    stages = tuple(_place(i, n, req, cfg, pp, n in full_nodes)
                   for i, n in enumerate(_order(chosen, full_nodes)))
    # A late fetch still holds its link for about bytes / bandwidth: reserve that, not zero.
    hold = deadline if met else max(deadline, 1.5 * stage_bytes / bw)
    reservations = {n.node_id: Reservation(math.ceil(stage_bytes), hold) for n in chosen}
    reason = (f"pp={pp} with {n_full} full share(s) meets both SLOs" if met else
              f"no plan meets the SLOs; pp={pp} with {n_full} full share(s) is the closest")
    boot = ready - stage_bytes / bw  # the wait for a boot that the fetch does not hide
    if boot > BOOT_WAIT_TOLERANCE_S:
        reason += f" (a stage waits about {boot:.1f} s past its fetch for a worker to boot)"
    return Plan(pp, stages, ttft, tpot, met, reason, reservations, boot)


def _order(chosen: list[NodeState], full_nodes: list[NodeState]) -> list[NodeState]:
    # Stage 0 owns the batch and is the one that could stand alone after consolidation (not
    # yet built): give it a full share.
    return full_nodes + [n for n in chosen if n not in full_nodes]


def _place(stage: int, node: NodeState, req: Request, cfg: PlannerConfig, pp: int,
           full: bool) -> StagePlacement:
    need = memory_need(req, cfg, pp, full)
    device = pick_device(node, need)
    assert device is not None, f"node {node.node_id} lost its device for {need} bytes"
    return StagePlacement(stage, node.node_id, device.device_id, need, full,
                          math.ceil(req.model_bytes / pp))


def _plan_from_cache(req: Request, nodes: list[NodeState], cfg: PlannerConfig) -> Plan | None:
    """A start with no fetch: the whole model cached on one node (pp = 1), else a pipeline whose
    every stage is cached on a distinct node (stage 0 with a full share where it fits). The
    smallest such pipeline that meets the SLOs, else the smallest one at all."""
    found = [plan for pp in range(1, largest_pp(req, cfg) + 1)
             if (plan := _cached_pipeline(req, nodes, cfg, pp)) is not None]
    return next((p for p in found if p.slo_met), found[0] if found else None)


def _cached_pipeline(req: Request, nodes: list[NodeState], cfg: PlannerConfig,
                     pp: int) -> Plan | None:
    chosen: list[tuple[NodeState, Device, bool]] = []
    nodes = sorted(nodes, key=lambda n: n.boot_wait_s)  # a booted worker first
    for stage in range(pp):
        for full in ((True, False) if stage == 0 and pp > 1 else (stage == 0,)):
            need = memory_need(req, cfg, pp, full)
            pick = next(((n, d) for n in nodes if n.holds(req.model_id, pp, stage)
                         and all(n.node_id != c.node_id for c, _, _ in chosen)
                         and (d := pick_device(n, need)) is not None), None)
            if pick is not None:
                chosen.append((*pick, full))
                break
        else:
            return None
    n_full = sum(full for _, _, full in chosen)
    inc = inflation(pp, n_full)
    tpot = req.tpot_s * inc + cfg.hop_s * (pp - 1)
    boot = max(n.boot_wait_s for n, _, _ in chosen)
    ttft = boot + req.prefill_s * inc + req.waited_s + cfg.init_overhead_s
    met = ttft <= req.ttft_slo_s and tpot <= req.tpot_slo_s
    stages = tuple(StagePlacement(i, n.node_id, d.device_id, memory_need(req, cfg, pp, full),
                                  full, 0) for i, (n, d, full) in enumerate(chosen))
    where = "the node" if pp == 1 else f"{pp} nodes, one stage each"
    return Plan(pp, stages, ttft, tpot, met, f"model cached on {where}: no fetch",
                boot_wait_s=boot)


def _fallback(req: Request, nodes: list[NodeState], cfg: PlannerConfig) -> Plan | None:
    """No plan meets the SLOs: pp=1 on the best-bandwidth node that fits, else the smallest
    pipeline of part shares that fits (``slo_met=False``); None only when nothing fits."""
    plan = _try(req, nodes, cfg, 1, 1, enforce_slo=False)
    for pp in range(2, largest_pp(req, cfg) + 1):
        plan = plan or _try(req, nodes, cfg, pp, 0, enforce_slo=False)
    return plan
