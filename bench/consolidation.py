"""Pipeline consolidation at the engine level: a pp = 4 pipeline serving a steady stream of
requests turns into the whole model on stage 0 (``gpu_runtime.consolidate``), against a
standalone pp = 1 engine of the same model serving the same requests side by side.

    python bench/consolidation.py --quick --json bench/results/consolidation.json  # ~3 min
    python bench/consolidation.py --json /tmp/consolidation.json  # the TPOT model (not run yet;
                                      # prefills of 2,000 tokens on one thread dominate it)

No platform processes: stage 0 and the standalone engine run in this process, stages 1..3 as
the pipeline's own child processes, the replicas of the throughput key as processes of their
own, every one on one torch thread (2 cores). The model is the
TPOT benchmark's random Llama (``bench/tpot.py``; ``--quick`` its small one), with room for
4,096 positions. Both engines get the same script of requests, iteration by iteration:
``batch`` requests at the start, then one every ``gap`` iterations, each decoding
``batch * gap`` tokens from a prompt of ``context - batch * gap / 2`` tokens, so about
``batch`` sequences are in flight with about ``context`` tokens each. Every iteration runs one
step of each engine (the order alternates, so the machine's noise hits both); the pipeline's
turn is ``tick()`` and its step, timed together. The pipeline serves ``pipeline_steps``
iterations, then stage 0's node fetches stages 1..3 into its cache over an emulated link
(``link_mb_s``, a background fetch) while the consolidator loads them from it
(``buffers_loader``), pre-copies the full KV blocks behind pipeline steps and switches; the
consolidated engine then serves ``after_steps`` more iterations. An arrival due at the switch's
iteration joins one iteration later on both engines, so the step after the switch is a decode
step. Only then comes ``release()``, and ``release_steps`` more iterations (phase
``released``): here the three stage processes exit on the cores both engines run on, and for
about a second both engines' steps take about twice as long, which stages on nodes of their own
would not cost stage 0 (it sends them a stop, on a thread). The ``released`` phase shows that
cost on its own rather than inside the switch and the consolidated medians.

Keys (decode steps only; a ratio against the standalone engine is the median of per-step
ratios of the same iterations, as in bench/tpot.py; the ratio of the medians is in ``runs``):
- ``tpot_pipeline_vs_standalone``: the pipeline before consolidation starts / standalone.
- ``tpot_after_vs_standalone`` (target <= 1.02): the consolidated engine / standalone.
- ``switch_stall_steps`` (target <= 2, and not growing with context): the worse of the runs
  at about 256 and 2,048 tokens of context (the 2,048 run takes the rest from the cache the
  first run filled: a hit): (the switch iteration's ``tick()`` + step - the
  median consolidated step) / the median consolidated step, the median over the consolidated
  steps of as many sequences as the switch's step (the batch varies by one as requests come
  and go). ``switch_pause_steps`` in ``runs`` is ``tick()``'s own pause in the same unit.
  "Not growing" is checked as ``switch_stall_steps_2048 <= switch_stall_steps_256 + 0.5``
  (one switch per context, so one sample each).
- ``tpot_loading_vs_standalone``, ``tpot_precopy_vs_standalone_<context>``: the pipeline's
  steps while the rest loads beside it, and those carrying a pre-copy ``kv_pull``.
- ``consolidation_s``: the consolidator's ``load_start`` (the fetch starts just before it) to
  ``switched_at``; ``fetch_rest_one_link_s``: the same bytes fetched alone over a fresh node's
  link of the same bandwidth; ``consolidation_vs_fetch``: their ratio.
- ``gb_s_vs_no_consolidation``: memory-time of the group over the first run (first recorded
  iteration to the last) with consolidation against staying a pipeline, shares as the planner
  sizes them: stage 0 a full share (1.25 x model bytes), stages 1..3 part shares (a quarter of
  that each) released at the switch (as the platform releases them), or held to the end.
- ``throughput_after_vs_one_replica`` (target >= 1.8): after a consolidation the platform runs
  stage 0 and every later full share as independent replicas of the whole model, both
  consuming the function's one request queue (docs/consolidation.md); spreading the sequences
  in flight at the switch to the other replica is not built. So this measures two replicas on
  one stream against one: each replica is its own spawned process on one torch thread whose
  whole model aliases one node-cache buffer of the model (a ``Prefetcher`` fetch of the
  ``pp = 1`` stage, then ``buffers_loader``: zero-copy on CPU, as a replica loads), warmed with
  ``warm_up``. Each keeps ``replica_batch`` requests of about the first context in flight
  (prompts of ``context - batch * gap / 2`` tokens decoding ``batch * gap`` each, lengths
  staggered so one finishes at a time, each refilled at once: the refills' prefills are in the
  time), serves ``replica_warmup_s``, then counts the tokens it generates in steps wholly inside
  a window of ``replica_seconds``. One replica alone, then both at once on the same window,
  ``replica_repeats`` times: the key is the median of the per-repeat ratios of total tokens/s;
  ``throughput_one_replica_tok_s`` / ``throughput_two_replicas_tok_s`` are the medians of each.

Each step's latency over time goes to the JSON (``steps``: the first run's; ``runs``: each
run's) and a plot of both runs (``--png``, default: the JSON's path with ``.png``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TypeVar

# short OpenMP spin, as bench/tpot.py: one process's idle threads do not slow the next's turn
for _key, _value in (("GOMP_SPINCOUNT", "20000"), ("KMP_BLOCKTIME", "1")):
    os.environ.setdefault(_key, _value)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import tpot  # noqa: E402
from bench.common import environment, markdown_table, median, write_json  # noqa: E402
from gpu_runtime.checkpoint import index_checkpoint  # noqa: E402
from gpu_runtime.coldstart import plan_group  # noqa: E402
from gpu_runtime.coldstart.plan import StagePlan  # noqa: E402
from gpu_runtime.consolidate import Consolidator, buffers_loader, warm_up, whole_spec  # noqa: E402
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model  # noqa: E402
from gpu_runtime.engine import EngineConfig, LLMEngine  # noqa: E402
from gpu_runtime.kv_cache import KVCache, KVCacheSpec  # noqa: E402
from gpu_runtime.limits import GB  # noqa: E402
from gpu_runtime.loader import plan_stages  # noqa: E402
from gpu_runtime.model_runner import LocalRunner  # noqa: E402
from gpu_runtime.prefetch import FetchJob, PrefetchConfig, Prefetcher  # noqa: E402
from gpu_runtime.prefetch.pool import EXTENT_ALIGN, extent_bytes  # noqa: E402
from gpu_runtime.sampling import SamplingParams  # noqa: E402
from gpu_runtime.stage import build_stage  # noqa: E402
from gpu_runtime.store.link import LinkConfig  # noqa: E402
from gpu_runtime.store.ranges import plan_stage  # noqa: E402

PP = 4
BLOCK_SIZE = 16
MAX_POSITIONS = 4096  # the TPOT model allows 2,048; the long run needs a little more
SHARE_FACTOR = 1.25  # a full share: model bytes plus the planner's KV reserve
SWITCH_TIMEOUT_S = 600.0
TARGETS = {"tpot_after_vs_standalone": 1.02, "switch_stall_steps": 2.0,
           "throughput_after_vs_one_replica": 1.8}
REPLICAS_NOTE = (
    "after a consolidation the platform runs stage 0 and every later full share as "
    "independent replicas consuming the function's one request queue; spreading the sequences "
    "in flight at the switch to the other replica is not built, so this measures what the "
    "platform does: two replica processes, each keeping a full batch of requests in flight "
    "from one stream (refilled as they finish), against one replica alone on the same "
    "per-replica load, generated tokens/s in total; each replica is a spawned process on one "
    "torch thread whose whole-model weights alias one node-cache buffer of the model "
    "(Prefetcher + buffers_loader, zero-copy on CPU), warmed as a consolidated replica is")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    model: tpot.BenchConfig  # the model's shape (the TPOT benchmark's)
    batch: int  # sequences in flight
    gap: int  # iterations between arrivals; each request decodes batch * gap tokens
    warmup_steps: int  # iterations before the clock starts (kernels, allocations)
    pipeline_steps: int  # recorded iterations as a pipeline before consolidation starts
    after_steps: int  # consolidated iterations after the switch
    release_steps: int  # iterations after ``release()`` (the other stages exit)
    link_mb_s: float  # stage 0's node link (the rest of the quick model in about 2 s)
    contexts: tuple[int, ...] = (256, 2048)
    dtype: str = "float32"
    replica_batch: int = 8  # sequences each replica keeps in flight (at the first context)
    replica_seconds: float = 10.0  # each throughput measurement's window
    replica_warmup_s: float = 1.0  # served before each window opens
    replica_repeats: int = 3  # one replica, then two, this many times: the median ratio

    def __post_init__(self) -> None:
        assert self.model.num_layers % PP == 0 and self.after_steps >= 3, f"{self}"
        assert all(c > self.new_tokens for c in self.contexts), f"{self}"

    @property
    def new_tokens(self) -> int:
        return self.batch * self.gap

    def prompt_len(self, context: int) -> int:
        return context - self.new_tokens // 2

    def num_kv_blocks(self, context: int) -> int:
        """Room for two sequences more than ``batch`` at their longest (no preemption)."""
        return (self.batch + 2) * -(-(context + self.new_tokens // 2) // BLOCK_SIZE)


FULL = BenchConfig(tpot.FULL, batch=4, gap=16, warmup_steps=8, pipeline_steps=40,
                   after_steps=60, release_steps=30, link_mb_s=250.0)
QUICK = BenchConfig(tpot.QUICK, batch=4, gap=16, warmup_steps=6, pipeline_steps=24,
                    after_steps=60, release_steps=30, link_mb_s=50.0)


def ensure_model(cfg: BenchConfig, cache: Path) -> Path:
    m = cfg.model
    out = cache / f"llama-h{m.hidden_size}-l{m.num_layers}-v{m.vocab_size}-pos{MAX_POSITIONS}"
    if not (out / "config.json").exists():
        overrides = tuple((dict(m.overrides()) | {"max_position_embeddings": MAX_POSITIONS})
                          .items())
        make_demo_model(out, DemoModelSpec("llama", "small", init_std=0.02, overrides=overrides))
    return out


# ---- the node cache: the rest of the model over one link ------------------------------------

def rest_plans(model_dir: Path) -> list[StagePlan]:
    """Stages 1..3 of the pp = 4 split, as a node is told to prefetch them."""
    index = index_checkpoint(model_dir.resolve().as_uri())
    return plan_group("bench-consolidation", index, PP)[1:]


def node(plans: list[StagePlan], link_mb_s: float) -> Prefetcher:
    """A fresh node cache with room for ``plans`` behind a link of ``link_mb_s``."""
    size = sum(extent_bytes(plan_stage(p.entries).size) for p in plans)
    pool = -(-size // EXTENT_ALIGN) * EXTENT_ALIGN
    return Prefetcher(PrefetchConfig(node_id=f"bench-cons-{uuid.uuid4().hex[:8]}",
                                     pool_bytes=pool,
                                     link=LinkConfig(bandwidth_mb_s=link_mb_s)))


def fetch(pf: Prefetcher, plans: list[StagePlan], background: bool) -> list[FetchJob]:
    return [pf.prefetch(p.model, p.cache_stage, p.uri, p.entries, background=background)
            for p in plans]


def fetch_alone_s(plans: list[StagePlan], link_mb_s: float) -> float:
    """Seconds to fetch every stage of ``plans`` at once over a fresh node's link."""
    pf = node(plans, link_mb_s)
    try:
        start = time.perf_counter()
        for job in fetch(pf, plans, background=False):
            job.wait(SWITCH_TIMEOUT_S)
        return time.perf_counter() - start
    finally:
        pf.close()


# ---- one run: a stream through the pipeline, its consolidation, the whole model -------------

@dataclass(frozen=True, slots=True)
class Stream:
    """The script of requests both engines get: ``batch`` at iteration 0 (lengths staggered
    so they finish one per ``gap``), then one every ``gap`` iterations."""

    prompt_len: int
    batch: int
    gap: int
    vocab_size: int

    def due(self, it: int) -> list[tuple[str, list[int], SamplingParams]]:
        if it == 0:
            return [self.request(i, self.gap * (i + 1)) for i in range(self.batch)]
        if it % self.gap == 0:
            return [self.request(self.batch - 1 + it // self.gap, self.batch * self.gap)]
        return []

    def request(self, i: int, new_tokens: int) -> tuple[str, list[int], SamplingParams]:
        prompt = [1] + [(31 * i + 17 * j) % (self.vocab_size - 3) + 3
                        for j in range(self.prompt_len - 1)]
        return f"r{i}", prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True)


@dataclass(slots=True)
class Record:
    """What one run saw, iteration by iteration (decode steps only in the series)."""

    t0: float = 0.0  # wall clock of the first recorded iteration
    fetch_start: float = 0.0  # wall clock: stage 0's node starts fetching the rest
    released_at: float = 0.0  # wall clock of ``release()``
    steps: list[list] = field(default_factory=list)  # [t since t0 s, pipeline ms, phase]
    standalone: list[list] = field(default_factory=list)  # [t since t0 s, standalone ms]
    batch: list[int] = field(default_factory=list)  # sequences of each step
    switch: dict = field(default_factory=dict)
    end: float = 0.0

    def by_phase(self, phase: str, batch: int | None = None) -> tuple[list[float], list[float]]:
        """(pipeline ms, standalone ms) of the decode iterations of ``phase`` (of ``batch``
        sequences only, when given)."""
        pairs = [(s[1], b[1]) for s, b, n in zip(self.steps, self.standalone, self.batch,
                                                 strict=True)
                 if s[2] == phase and batch in (None, n)]
        return [a for a, _ in pairs], [b for _, b in pairs]


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(milliseconds, result) of one call."""
    start = time.perf_counter()
    out = fn()
    return 1e3 * (time.perf_counter() - start), out


def decode_step(engine: LLMEngine) -> tuple[float, int]:
    """(ms, sequences decoded: 0 for a prefill step) of one engine step."""
    before = engine.num_prefill_tokens
    ms, outs = timed(engine.step)
    return ms, len(outs) if engine.num_prefill_tokens == before else 0


class Run:
    """One run at about ``context`` tokens (see the module docstring): both engines, the
    script, the consolidator once it starts, and the record."""

    def __init__(self, cfg: BenchConfig, context: int, model_dir: Path, pf: Prefetcher,
                 plans: list[StagePlan]) -> None:
        self.cfg, self.pf, self.plans = cfg, pf, plans
        self.stream = Stream(cfg.prompt_len(context), cfg.batch, cfg.gap, cfg.model.vocab_size)
        config, specs, _ = plan_stages(model_dir, 1)
        self.spec = whole_spec(specs[0], specs[0].tensor_names, config.num_layers,
                               specs[0].num_bytes)
        alone = EngineConfig(model=str(model_dir), dtype=cfg.dtype, device="cpu", num_threads=1,
                             block_size=BLOCK_SIZE, num_kv_blocks=cfg.num_kv_blocks(context))
        self.piped = LLMEngine(replace(alone, pp=PP))
        self.alone = LLMEngine(alone)
        self.c: Consolidator | None = None
        self.jobs: list[FetchJob] = []
        self.pending: list[tuple] = []  # arrivals held back at the switch
        self.released: threading.Thread | None = None
        self.rec = Record()

    def serve(self) -> Record:
        """Iterations until ``after_steps`` consolidated decode steps are recorded, then the
        release and ``release_steps`` more iterations."""
        it, after = 0, 0
        while after < self.cfg.after_steps:
            if it == self.cfg.warmup_steps:
                self.rec.t0 = time.time()
            if it == self.cfg.warmup_steps + self.cfg.pipeline_steps:
                self.consolidate()
            phase, decode = self.iteration(it)
            after += phase == "consolidated" and decode
            it += 1
        assert self.c is not None
        self.rec.released_at = time.time()
        self.rec.switch["release_ms"], self.released = timed(self.c.release)
        for i in range(it, it + self.cfg.release_steps):
            self.iteration(i)
        self.rec.end = time.time()
        prefilled = [e.num_prefill_tokens for e in (self.piped, self.alone)]
        assert prefilled[0] == prefilled[1], f"the engines prefilled {prefilled} tokens"
        return self.rec

    def consolidate(self) -> None:
        """Stage 0's node starts fetching the rest; the consolidator loads it as it comes."""
        self.rec.fetch_start = time.time()
        self.jobs = fetch(self.pf, self.plans, background=True)
        self.c = Consolidator(self.piped, self.spec,
                              buffers_loader([(j.handle, j.layout) for j in self.jobs]))

    def iteration(self, it: int) -> tuple[str, bool]:
        """One step of each engine, in alternating order; returns the pipeline's phase and
        whether its step decoded."""
        c = self.c
        rounds = c.stats.precopy_rounds if c else 0
        if it % 2:
            sa_ms, _ = decode_step(self.alone)
            pp_ms, switched, decoded = self.pipeline_turn(it)
        else:
            pp_ms, switched, decoded = self.pipeline_turn(it)
            sa_ms, _ = decode_step(self.alone)
        phase = self.phase(switched, rounds)
        if switched:
            self.rec.switch |= {"iteration_ms": pp_ms, "batch": decoded}
        if it >= self.cfg.warmup_steps and decoded:
            t = round(time.time() - self.rec.t0, 4)
            self.rec.steps.append([t, round(pp_ms, 3), phase])
            self.rec.standalone.append([t, round(sa_ms, 3)])
            self.rec.batch.append(decoded)
        return phase, bool(decoded)

    def phase(self, switched: bool, rounds_before: int) -> str:
        """The pipeline's phase in the iteration that just ran."""
        c = self.c
        if c is None:
            return "pipeline"
        if switched:
            return "switch"
        if c.consolidated:
            return "released" if self.released else "consolidated"
        return "precopy" if c.stats.precopy_rounds > rounds_before else "loading"

    def pipeline_turn(self, it: int) -> tuple[float, bool, int]:
        """The pipeline's turn: ``tick()``, the arrivals, its step; returns (ms, switched now,
        sequences decoded)."""
        ms, switched = 0.0, False
        c = self.c
        if c is not None and not c.consolidated:
            assert not c.failed, f"consolidation failed: {c.stats.error}"
            assert time.time() - c.stats.load_start < SWITCH_TIMEOUT_S, "no switch in time"
            ms, switched = timed(c.tick)
            if switched:
                self.rec.switch["context"] = mean_context(self.piped)
        self.pending.extend(self.stream.due(it))
        if not switched:  # an arrival due at the switch joins one iteration later
            for engine in (self.piped, self.alone):
                for request in self.pending:
                    engine.add_request(*request)
            self.pending.clear()
        step_ms, decoded = decode_step(self.piped)
        return ms + step_ms, switched, decoded

    def close(self) -> dict:
        """Stops both engines and unpins the rest; returns what the fetch did."""
        if self.released is not None:
            self.released.join(30)
        self.piped.close()
        self.alone.close()
        stats = [j.wait(SWITCH_TIMEOUT_S).to_dict() for j in self.jobs]
        for j in self.jobs:
            j.release()
        return {"fetch_started_before_load_s": self.c.stats.load_start - self.rec.fetch_start
                if self.c else None, "jobs": stats}


def mean_context(engine: LLMEngine) -> float:
    """Mean tokens of the running sequences."""
    running = engine.scheduler.running
    return sum(s.num_tokens for s in running) / len(running)


def run(cfg: BenchConfig, context: int, model_dir: Path, pf: Prefetcher,
        plans: list[StagePlan]) -> dict:
    """One run's figures (``summarise``)."""
    r = Run(cfg, context, model_dir, pf, plans)
    try:
        rec = r.serve()
    finally:
        fetched = r.close()
    assert r.c is not None and r.c.consolidated, f"no switch: {r.c and r.c.stats}"
    return summarise(rec, r.c, fetched)


# ---- after the switch: two replicas of the whole model on one stream of requests -------------

REPLICA_LINK_MB_S = 100_000.0  # the node cache of the whole model: its fill is not measured


@dataclass(frozen=True, slots=True)
class ReplicaJob:
    """What a replica process needs: the whole model's node-cache buffer and the load."""

    model_dir: str
    handle: object  # BufferHandle of the whole model (pp = 1) in the node's cache
    layout: object  # its StageLayout
    context: int
    batch: int
    new_tokens: int
    vocab_size: int
    dtype: str


def replica_engine(job: ReplicaJob) -> tuple[LLMEngine, list]:
    """The whole model, its weights aliasing the node cache (``buffers_loader``, zero-copy
    on CPU), warmed as a consolidated replica is (``warm_up``), in an engine of its own."""
    import torch

    torch.set_num_threads(1)
    config, specs, _ = plan_stages(job.model_dir, 1)
    dtype = getattr(torch, job.dtype)
    whole = build_stage(config, specs[0], dtype, "cpu")
    keep = buffers_loader([(job.handle, job.layout)])(whole, set())
    assert not whole.missing(), f"not in the node cache: {whole.missing()[:3]}"
    warm_up(whole, BLOCK_SIZE)
    blocks = (job.batch + 2) * -(-(job.context + job.new_tokens // 2) // BLOCK_SIZE)
    kv = KVCache(KVCacheSpec(0, len(specs[0].layers), blocks, BLOCK_SIZE, config.num_kv_heads,
                             config.head_dim, dtype), torch.device("cpu"))
    cfg = EngineConfig(model=job.model_dir, pp=1, num_threads=1, dtype=job.dtype, device="cpu",
                       block_size=BLOCK_SIZE, num_kv_blocks=blocks)
    return LLMEngine.from_loaded(cfg, specs, kv, LocalRunner(whole, kv)), keep


def replica_main(job: ReplicaJob, commands, results) -> None:
    """A replica process: a full batch in flight, refilled as each request finishes (the
    lengths staggered so they finish one at a time); per command ``(go, end)`` it serves from
    now to ``end`` and reports the tokens of the steps that ended in ``[go, end]``."""
    engine, _keep = replica_engine(job)
    prompt_len = job.context - job.new_tokens // 2
    ids = iter(range(1 << 30))

    def add(new_tokens: int) -> None:
        i = next(ids)
        prompt = [1] + [(31 * i + 17 * j) % (job.vocab_size - 3) + 3
                        for j in range(prompt_len - 1)]
        engine.add_request(f"q{i}", prompt, SamplingParams(max_tokens=new_tokens,
                                                           ignore_eos=True))

    def step() -> int:
        outs = engine.step()
        for o in outs:
            if o.finished:
                add(job.new_tokens)
        return sum(len(o.new_token_ids) for o in outs)

    for i in range(job.batch):
        add(max(1, job.new_tokens * (i + 1) // job.batch))
    for _ in range(2 * job.batch):  # the first prefill and a few refills: the steady state
        step()
    results.put(("ready", 0, 0.0, 0))
    while (cmd := commands.get()) is not None:
        go, end = cmd
        tokens = steps = 0
        while (now := time.time()) < end:
            n = step()
            if now >= go and time.time() <= end:  # steps wholly inside the window
                tokens, steps = tokens + n, steps + 1
        results.put(("done", tokens, end - go, steps))
    engine.close()


def replica_throughput(cfg: BenchConfig, model_dir: Path) -> dict:
    """Generated tokens/s of one replica alone, then of two at once on the same per-replica
    load, ``replica_repeats`` times; each its own (spawned) process on one torch thread."""
    import multiprocessing as mp

    index = index_checkpoint(model_dir.resolve().as_uri())
    (plan,) = plan_group("bench-consolidation-replicas", index, 1)
    pf = node([plan], REPLICA_LINK_MB_S)
    ctx = mp.get_context("spawn")
    procs: list = []
    try:
        (job,) = fetch(pf, [plan], background=False)
        job.wait(SWITCH_TIMEOUT_S)
        rj = ReplicaJob(str(model_dir), job.handle, job.layout, min(cfg.contexts),
                        cfg.replica_batch, cfg.new_tokens, cfg.model.vocab_size, cfg.dtype)
        results = ctx.Queue()
        queues = [ctx.Queue() for _ in range(2)]
        procs = [ctx.Process(target=replica_main, args=(rj, q, results), daemon=True)
                 for q in queues]
        for p in procs:
            p.start()
        for _ in procs:
            assert results.get(timeout=SWITCH_TIMEOUT_S)[0] == "ready"

        def measure(n: int) -> dict:
            go = time.time() + cfg.replica_warmup_s
            for q in queues[:n]:
                q.put((go, go + cfg.replica_seconds))
            got = [results.get(timeout=SWITCH_TIMEOUT_S) for _ in range(n)]
            per = [t / s for _, t, s, _ in got]
            return {"tok_s": sum(per), "per_replica_tok_s": per,
                    "tokens": [g[1] for g in got], "steps": [g[3] for g in got]}

        reps = []
        for _ in range(cfg.replica_repeats):
            one, two = measure(1), measure(2)
            reps.append({"one": one, "two": two, "ratio": two["tok_s"] / one["tok_s"],
                         "load_avg_1m": os.getloadavg()[0]})
        for q in queues:
            q.put(None)
        for p in procs:
            p.join(30)
        job.release()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        pf.close()
    return {"throughput_after_vs_one_replica": median([r["ratio"] for r in reps]),
            "throughput_one_replica_tok_s": median([r["one"]["tok_s"] for r in reps]),
            "throughput_two_replicas_tok_s": median([r["two"]["tok_s"] for r in reps]),
            "replica_runs": reps}


# ---- figures ----------------------------------------------------------------------------------

def compare(pp_ms: list[float], sa_ms: list[float]) -> dict:
    """Medians of the same iterations, and the median of their per-step ratios."""
    return {"steps": len(pp_ms), "median_ms": median(pp_ms),
            "standalone_median_ms": median(sa_ms),
            "vs_standalone_of_medians": median(pp_ms) / median(sa_ms),
            "vs_standalone": median([a / b for a, b in zip(pp_ms, sa_ms, strict=True)])}


def summarise(rec: Record, c: Consolidator, fetched: dict) -> dict:
    """One run's figures: medians by phase, ratios against the standalone engine, the stall
    (against the consolidated steps of the switch's batch size)."""
    assert rec.switch["batch"], "the step after the switch did not decode"
    s = c.stats
    assert s.switched_at is not None and s.load_end is not None, s
    out: dict = {"stats": s.to_dict(), "context_at_switch": rec.switch["context"]}
    for phase in ("pipeline", "loading", "precopy", "consolidated", "released"):
        pp_ms, sa_ms = rec.by_phase(phase)
        if pp_ms:
            out[phase] = compare(pp_ms, sa_ms)
    same = rec.by_phase("consolidated", rec.switch["batch"])[0]
    post = median(same)
    out["switch"] = {"iteration_ms": rec.switch["iteration_ms"], "batch": rec.switch["batch"],
                     "post_median_ms": post, "post_steps": len(same)}
    out["switch_stall_steps"] = (rec.switch["iteration_ms"] - post) / post
    out["switch_pause_steps"] = 1e3 * s.switch_s / post
    out["consolidation_s"] = s.switched_at - s.load_start
    out["load_s"] = s.load_end - s.load_start
    out["fetch"] = fetched
    out["t0"], out["end"], out["released_at"] = rec.t0, rec.end, rec.released_at
    out["release_ms"] = rec.switch["release_ms"]
    out["steps"], out["standalone_steps"], out["batch"] = rec.steps, rec.standalone, rec.batch
    return out


def memory_time(model_bytes: int, run: dict) -> dict:
    """GB-s of the group over ``run``: consolidated (part shares released at the switch)
    against a pipeline that keeps every share to the end."""
    full = SHARE_FACTOR * model_bytes / GB
    parts = (PP - 1) * full / PP
    run_s, piped_s = run["end"] - run["t0"], run["stats"]["switched_at"] - run["t0"]
    with_c, without = full * run_s + parts * piped_s, (full + parts) * run_s
    return {"gb_s_vs_no_consolidation": with_c / without, "gb_s_consolidated": with_c,
            "gb_s_no_consolidation": without, "memory_time_run_s": run_s,
            "memory_time_switch_at_s": piped_s}


def keys(runs: dict[int, dict], fetch_s: float, model_bytes: int) -> dict:
    main = runs[min(runs)]
    stalls = {f"switch_stall_steps_{ctx}": r["switch_stall_steps"] for ctx, r in runs.items()}
    return {"tpot_pipeline_vs_standalone": main["pipeline"]["vs_standalone"],
            "tpot_after_vs_standalone": main["consolidated"]["vs_standalone"],
            **{f"tpot_after_vs_standalone_{ctx}": r["consolidated"]["vs_standalone"]
               for ctx, r in runs.items()},
            "tpot_loading_vs_standalone": main["loading"]["vs_standalone"],
            **{f"tpot_precopy_vs_standalone_{ctx}": r["precopy"]["vs_standalone"]
               for ctx, r in runs.items()},
            "switch_stall_steps": max(stalls.values()), **stalls,
            "consolidation_s": main["consolidation_s"], "fetch_rest_one_link_s": fetch_s,
            "consolidation_vs_fetch": main["consolidation_s"] / fetch_s,
            **memory_time(model_bytes, main)}


def report_rows(k: dict, contexts: tuple[int, ...]) -> list[dict]:
    def row(key: str, target: str = "", met: bool | None = None) -> dict:
        return {"key": key, "value": k[key], "target": target,
                "met": "" if met is None else ("met" if met else "not met")}

    lo, hi = (f"switch_stall_steps_{c}" for c in (min(contexts), max(contexts)))
    return [row("tpot_pipeline_vs_standalone"),
            row("tpot_after_vs_standalone", "<= 1.02",
                k["tpot_after_vs_standalone"] <= TARGETS["tpot_after_vs_standalone"]),
            row(f"tpot_after_vs_standalone_{max(contexts)}"), row("tpot_loading_vs_standalone"),
            *(row(f"tpot_precopy_vs_standalone_{c}") for c in contexts),
            row("switch_stall_steps", "<= 2",
                k["switch_stall_steps"] <= TARGETS["switch_stall_steps"]),
            row(lo), row(hi, f"no growth: <= {lo} + 0.5", k[hi] <= k[lo] + 0.5),
            row("consolidation_s"), row("fetch_rest_one_link_s"), row("consolidation_vs_fetch"),
            row("throughput_after_vs_one_replica", ">= 1.8",
                k["throughput_after_vs_one_replica"]
                >= TARGETS["throughput_after_vs_one_replica"]),
            row("throughput_one_replica_tok_s"), row("throughput_two_replicas_tok_s"),
            row("gb_s_vs_no_consolidation"), row("gb_s_consolidated"),
            row("gb_s_no_consolidation")]


PHASE_COLOURS = {"pipeline": "tab:blue", "loading": "tab:cyan", "precopy": "tab:orange",
                 "switch": "tab:red", "consolidated": "tab:green", "released": "tab:purple"}


def plot(runs: dict[int, dict], path: Path, title: str) -> None:
    """Each run's decode steps over time, coloured by phase, the standalone engine's beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.6 * len(runs)), squeeze=False)
    for ax, (ctx, run) in zip(axes[:, 0], runs.items(), strict=True):
        panel(ax, run, f"~{ctx} tokens of context")
    axes[-1, 0].set_xlabel("seconds since the first recorded step")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def panel(ax, run: dict, title: str) -> None:
    sa = run["standalone_steps"]
    ax.plot([p[0] for p in sa], [p[1] for p in sa], color="0.6", lw=1, label="standalone pp=1")
    for phase, colour in PHASE_COLOURS.items():
        pts = [p for p in run["steps"] if p[2] == phase]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, color=colour,
                       label=f"pp=4: {phase}", zorder=3)
    s = run["stats"]
    for stamp, name, y in ((s["load_start"], "consolidation starts", 1.0),
                           (s["load_end"], "loaded", 0.6), (s["switched_at"], "switch", 1.0),
                           (run["released_at"], "release()", 1.0)):
        ax.axvline(stamp - run["t0"], color="0.3", ls="--", lw=0.8)
        ax.annotate(name, (stamp - run["t0"], y), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8)
    ax.set_ylabel("decode step ms")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write raw numbers and ratios here")
    ap.add_argument("--png", default=None, help="the plot (default: --json with .png)")
    ap.add_argument("--quick", action="store_true", help="the TPOT benchmark's small model")
    ap.add_argument("--cache", default=os.environ.get("HYDRA_BENCH_CACHE", "/tmp/hydra-bench"))
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    model_dir = ensure_model(cfg, Path(args.cache))
    plans = rest_plans(model_dir)
    fetch_s = fetch_alone_s(plans, cfg.link_mb_s)
    pf = node(plans, cfg.link_mb_s)
    try:
        runs = {ctx: run(cfg, ctx, model_dir, pf, plans) for ctx in cfg.contexts}
    finally:
        pf.close()
    replicas = replica_throughput(cfg, model_dir)
    model_bytes = index_checkpoint(model_dir.resolve().as_uri()).total_bytes
    k = keys(runs, fetch_s, model_bytes) | {key: v for key, v in replicas.items()
                                            if key != "replica_runs"}
    print(markdown_table(report_rows(k, cfg.contexts), ["key", "value", "target", "met"],
                         "{:.3f}"))
    main_run = runs[min(runs)]
    png = Path(args.png) if args.png else (Path(args.json).with_suffix(".png")
                                           if args.json else None)
    if png is not None:
        plot(runs, png, f"pp=4 -> 1 consolidation while serving "
                        f"({'quick' if args.quick else 'full'}: {cfg.model.num_params / 1e6:.0f}M "
                        f"params, {cfg.dtype})")
    write_json(args.json, {
        "benchmark": "consolidation", "quick": args.quick, "config": asdict(cfg),
        "environment": environment() | {"load_avg_1m_start": load_at_start}, "wall_s": time.perf_counter() - started, "model_bytes": model_bytes,
        "rest_bytes": sum(p.fetch_bytes for p in plans), **k,
        "notes": {"throughput_after_vs_one_replica": REPLICAS_NOTE},
        "replica_runs": replicas["replica_runs"],
        "steps": main_run["steps"], "standalone_steps": main_run["standalone_steps"],
        "runs": {str(ctx): r for ctx, r in runs.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
