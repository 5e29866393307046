"""Loading throughput: from the node cache (shared memory, already fetched) into ready-to-run
parameters, against a plain memory copy of the same bytes, ``safetensors.torch.load_file`` +
``load_state_dict``, and ``transformers.from_pretrained`` from the same files.

    python bench/load.py --json bench/results/load.json     # 1.1B-param bf16 Llama (2.2 GB)
    python bench/load.py --quick --json /tmp/load.json       # 4 layers of it (0.6 GB)
    python bench/load.py --device cuda --json /tmp/load-gpu.json   # host-to-device, load_h2d.py

Every measurement runs in a fresh spawned process (imports done before the clock starts), in
interleaved rounds, so each method starts from the same state: the checkpoint files in the page
cache, the stage complete in the node's pre-faulted pool (held by this process, the "node
agent"). Ours = map the buffer (MAP_POPULATE, so no page faults are left for the first forward),
build the stage on ``meta``, stream every tensor into it; on CPU the parameters alias the cache,
so no weight byte is copied. Every method ends by reading one byte of every 4 KiB page of every
parameter, so "ready" means mapped and resident for the first forward (a lazily mmapped file
would otherwise fault then). memcpy = ``dst.copy_(src)`` of the same bytes from the mapped
buffer into a pre-faulted tensor (its best case). Private memory is the child's
``Private_Clean + Private_Dirty`` growth (``/proc/self/smaps_rollup``) across the load.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, in_child, markdown_table, write_json  # noqa: E402
from gpu_runtime.checkpoint import TensorEntry, index_checkpoint  # noqa: E402
from gpu_runtime.coldstart import plan_group  # noqa: E402
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model  # noqa: E402
from gpu_runtime.limits import GB  # noqa: E402
from gpu_runtime.prefetch import PrefetchConfig, Prefetcher  # noqa: E402
from gpu_runtime.prefetch.pool import EXTENT_ALIGN, extent_bytes  # noqa: E402
from gpu_runtime.store.ranges import TensorPlacement, plan_stage  # noqa: E402

METHODS = ("memcpy", "ours", "safetensors", "transformers")


@dataclass(frozen=True, slots=True)
class LoadBenchConfig:
    num_layers: int  # of the 1.1B TinyLlama shape (22 = the whole model)
    repeats: int

    def __post_init__(self) -> None:
        assert 1 <= self.num_layers <= 22 and self.repeats >= 1, f"{self}"

    @property
    def spec(self) -> DemoModelSpec:
        over = () if self.num_layers == 22 else (("num_hidden_layers", self.num_layers),)
        return DemoModelSpec("llama", "1b", "bfloat16", overrides=over)

    @property
    def name(self) -> str:
        return "llama-1b-bf16-s0" + ("" if self.num_layers == 22 else f"-l{self.num_layers}")


FULL = LoadBenchConfig(num_layers=22, repeats=3)
QUICK = LoadBenchConfig(num_layers=4, repeats=2)


def ensure_model(cache: Path, name: str, spec: DemoModelSpec) -> Path:
    """The random checkpoint ``name`` under ``cache``, made once."""
    out = cache / name
    if not (out / "config.json").is_file():
        tmp = cache / f"{name}.tmp-{uuid.uuid4().hex[:6]}"
        make_demo_model(tmp, spec)
        tmp.rename(out)
    return out


# ---- measurements, each in a fresh process ---------------------------------------------------

def private_bytes() -> dict[str, int]:
    """Private (unshared) and anonymous bytes of this process, from smaps_rollup."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[key] = int(rest.split()[0]) * 1024
    return {"private": fields["Private_Clean"] + fields["Private_Dirty"],
            "anon": fields["Anonymous"], "rss": fields["Rss"]}


def touch(params) -> int:
    """Reads one byte of every 4 KiB page of every parameter: after this the weights are
    ready to run (a lazily mapped file would otherwise fault during the first forward)."""
    import torch

    total = 0
    for p in params:
        if p.is_meta:
            continue
        flat = p.detach().reshape(-1).view(torch.uint8)  # (nbytes,)
        total += int(flat[::4096].sum())
    return total


def _memcpy(job: dict):
    import torch

    from gpu_runtime.prefetch import open_buffer

    buffer = open_buffer(job["handle"], populate=True)
    whole = TensorPlacement(TensorEntry("all", "U8", (job["size"],), "", 0, job["size"]), 0)
    src = buffer.tensor(whole)  # (size,) uint8 view of the buffer
    dst = torch.zeros(job["size"], dtype=torch.uint8)  # pre-faulted: the copy's best case
    return lambda: dst.copy_(src), (buffer, src, dst)


def _ours(job: dict):
    import torch

    from gpu_runtime.coldstart import stream_into
    from gpu_runtime.config import parse_config
    from gpu_runtime.prefetch import open_buffer
    from gpu_runtime.stage import build_stage

    config = parse_config(job["config"])
    keep: list = []

    def run() -> None:
        buffer = open_buffer(job["handle"], populate=True)
        stage = build_stage(config, job["spec"], torch.bfloat16)
        stream_into(stage, buffer, job["layout"])
        touch(stage.parameters())
        keep.extend([buffer, stage])
    return run, keep


def _safetensors(job: dict):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(job["model_dir"])
    keep: list = []

    def run() -> None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.to_empty(device="cpu")
        for f in job["files"]:
            model.load_state_dict(load_file(f), strict=False)
        touch(model.parameters())
        keep.append(model)
    return run, keep


def _transformers(job: dict):
    import torch
    from transformers import AutoModelForCausalLM

    keep: list = []

    def run() -> None:
        model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.bfloat16)
        touch(model.parameters())
        keep.append(model)
    return run, keep


SETUP = {"memcpy": _memcpy, "ours": _ours, "safetensors": _safetensors,
         "transformers": _transformers}


def child(conn, method: str, job: dict) -> None:
    """Runs one measurement in this (fresh) process and sends the figures back."""
    import torch

    from gpu_runtime.coldstart.runtime import warm_meta

    torch.set_num_threads(job["threads"])
    warm_meta()  # one-time torch imports every method's skeleton would pay; a worker pays at boot
    run, keep = SETUP[method](job)
    gc.collect()
    before = private_bytes()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    after = private_bytes()
    conn.send({"seconds": seconds, **{f"{k}_delta": after[k] - before[k] for k in before}})
    del keep


def measure(method: str, job: dict) -> dict:
    return in_child(child, (method, job), f"{method} measurement")


# ---- the run ----------------------------------------------------------------------------------

def prepare(model_dir: Path, threads: int, shm_dir: str = "/dev/shm") -> tuple[Prefetcher, dict]:
    """A node cache holding the whole model (fetched from file://, no cap) and the job spec."""
    index = index_checkpoint(model_dir.resolve().as_uri())
    plan = plan_group("bench-load", index, 1)[0]
    size = extent_bytes(plan_stage(plan.entries).size)
    pool_bytes = -(-size // EXTENT_ALIGN) * EXTENT_ALIGN
    pf = Prefetcher(PrefetchConfig(node_id=f"bench-load-{uuid.uuid4().hex[:6]}",
                                   pool_bytes=pool_bytes, shm_dir=shm_dir))
    job = pf.prefetch(plan.model, plan.cache_stage, plan.uri, plan.entries)
    stats = job.wait(600)
    files = sorted({str(model_dir / e.file) for e in index.tensors})
    return pf, {"handle": job.handle, "layout": job.layout, "size": job.layout.size,
                "config": index.config, "spec": plan.spec, "model_dir": str(model_dir),
                "files": files, "threads": threads, "model_bytes": index.total_bytes,
                "fetch_mb_s": stats.mb_per_s}


def shm_huge(shm_dir: str) -> str:
    """The ``huge=`` option of the tmpfs mount holding ``shm_dir`` ("never" when absent)."""
    best, option = "", "never"
    with open("/proc/mounts") as f:
        for line in f:
            _, point, kind, opts, *_ = line.split()
            if kind == "tmpfs" and shm_dir.startswith(point) and len(point) > len(best):
                best = point
                option = next((o[5:] for o in opts.split(",") if o.startswith("huge=")), "never")
    return option


def summarise(runs: dict[str, list[dict]], model_bytes: int) -> dict:
    out: dict = {"methods": {}}
    for method, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        out["methods"][method] = {
            "seconds": secs, "median_s": median(secs), "best_s": min(secs),
            "gb_per_s": model_bytes / median(secs) / GB,
            "private_delta_bytes": median(r["private_delta"] for r in rs),
            "anon_delta_bytes": median(r["anon_delta"] for r in rs)}
    m = out["methods"]
    out["ratio_vs_memcpy"] = m["memcpy"]["median_s"] / m["ours"]["median_s"]
    out["ratio_vs_memcpy_best"] = m["memcpy"]["best_s"] / m["ours"]["best_s"]
    out["speedup_vs_transformers"] = m["transformers"]["median_s"] / m["ours"]["median_s"]
    out["speedup_vs_safetensors"] = m["safetensors"]["median_s"] / m["ours"]["median_s"]
    out["private_mem_vs_model_bytes"] = max(0, m["ours"]["private_delta_bytes"]) / model_bytes
    return out


def print_report(summary: dict, model_bytes: int) -> None:
    rows = [{"method": k, "median s": v["median_s"], "best s": v["best_s"],
             "GB/s": v["gb_per_s"], "private MB": v["private_delta_bytes"] / 1e6,
             "anon MB": v["anon_delta_bytes"] / 1e6} for k, v in summary["methods"].items()]
    print(f"\nloading {model_bytes / GB:.2f} GB of bf16 weights (CPU)\n")
    print(markdown_table(rows, ["method", "median s", "best s", "GB/s", "private MB", "anon MB"],
                         "{:.3f}"))
    print(f"\nratio_vs_memcpy {summary['ratio_vs_memcpy']:.2f} (target >= 0.8), "
          f"speedup_vs_transformers {summary['speedup_vs_transformers']:.1f} (target >= 3), "
          f"private_mem_vs_model_bytes {summary['private_mem_vs_model_bytes']:.4f} "
          "(target <= 0.1)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write raw numbers and ratios here")
    ap.add_argument("--quick", action="store_true", help="4 layers (0.6 GB), 2 rounds")
    ap.add_argument("--cache", default=os.environ.get("HYDRA_BENCH_CACHE", "/tmp/hydra-bench"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process "
                    "(1: a plain single-stream copy; see bench/coldstart.py on threads here)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--shm-dir", default="/dev/shm", help="tmpfs of the node pool; a mount with "
                    "huge=within_size maps 2 MiB pages (see docs/benchmarks.md)")
    ap.add_argument("--layers", type=int, default=None, help="layers of the 1.1B shape (1..22)")
    ap.add_argument("--device", default="cpu", help="cuda or cuda:N: host-to-device from the "
                    "node cache (registered and staged) against a copy of pinned memory")
    ap.add_argument("--h2d", action="store_true", help="the host-to-device methods even on "
                    "--device cpu (a dry run of their plumbing: nothing crosses a bus)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.repeats or args.layers:
        cfg = LoadBenchConfig(args.layers or cfg.num_layers, args.repeats or cfg.repeats)
    started = time.perf_counter()
    model_dir = ensure_model(Path(args.cache), cfg.name, cfg.spec)
    pf, job = prepare(model_dir, args.threads, args.shm_dir)
    if args.h2d or args.device != "cpu":
        from bench.load_h2d import run_h2d

        try:
            return run_h2d(args, cfg, job, started)
        finally:
            pf.close()
    try:
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for _ in range(cfg.repeats):  # interleaved rounds: a noisy neighbour hits all methods
            for method in METHODS:
                runs[method].append(measure(method, job))
    finally:
        pf.close()
    summary = summarise(runs, job["model_bytes"])
    print_report(summary, job["model_bytes"])
    write_json(args.json, {"benchmark": "load", "quick": args.quick, "config": asdict(cfg),
                           "model_bytes": job["model_bytes"], "model_dir": str(model_dir),
                           "cache_fetch_mb_s": job["fetch_mb_s"], "shm_dir": args.shm_dir,
                           "shm_huge": shm_huge(args.shm_dir), "env": environment(),
                           "wall_s": time.perf_counter() - started, **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
