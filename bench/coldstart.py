"""Cold-start TTFT of a bf16 Llama checkpoint served by the store through emulated per-node links:
the sequential baseline against our overlapped, pipeline-parallel cold start, and the lower bound.

    python bench/coldstart.py --json bench/results/coldstart.json \\
        --png bench/results/coldstart.png                       # 1.1B params, 2.2 GB
    python bench/coldstart.py --quick --json /tmp/coldstart.json   # 4 layers (0.6 GB)

- sequential: a fresh Python process (its start and imports count) downloads the whole
  checkpoint through one capped link (same parallel fetcher, 4 connections), then
  ``transformers.from_pretrained``, then the prefill. TTFT from just before the process starts.
- ours ppK: K emulated nodes, each its own prefetcher (own pool, own link cap) and worker pool
  with one pre-started worker; stages connected by the real zmq channel. TTFT from the plan
  (the split is computed inside the timed region) to the first token at stage 0.
  ``pp1-spawn``: no pre-started worker, the process is started when the plan arrives.
- bound: ``model bytes / (K * link) + prefill``, prefill measured warm on the pp=1 engine.

One process plays the scheduler and every node agent; the store server is its own process.
Every process computes with ``--threads`` torch threads (default 1, see ``main``). With
``--device cuda`` every stage (and the baseline's model) runs on that one GPU: each emulated
node's worker boots a CUDA context there, and each stage's load reports its host-to-device path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from gpu_runtime.ports import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, write_json  # noqa: E402
from gpu_runtime.limits import MB

PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889, 13, 4013, 338,
          263]  # 16 tokens


@dataclass(frozen=True, slots=True)
class ColdBenchConfig:
    num_layers: int  # of the 1.1B TinyLlama shape (22 = the whole model)
    links_mb_s: tuple[float, ...]
    pps: tuple[int, ...]
    spawn_variant: bool  # also run pp=1 with no pre-started worker
    kv_cache_bytes: int = 64 * MB

    def __post_init__(self) -> None:
        assert 1 <= self.num_layers <= 22 and self.links_mb_s and 4 in self.pps, f"{self}"

    @property
    def name(self) -> str:
        return "llama-1b-bf16-s0" + ("" if self.num_layers == 22 else f"-l{self.num_layers}")


FULL = ColdBenchConfig(22, (100.0, 400.0), (1, 2, 4), True)
QUICK = ColdBenchConfig(4, (100.0,), (1, 2, 4), False)  # the headline link only: < 3 min


# ---- the sequential baseline (runs as its own process) -------------------------------------

def baseline_child(uri: str, files: list[str], link_mb_s: float, out_dir: str,
                   threads: int, device: str = "cpu") -> dict:
    """Download everything through one capped link, from_pretrained, prefill; stamps phases."""
    started = time.time()
    import mmap

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    from gpu_runtime.checkpoint import Source
    from gpu_runtime.store import Chunk, FetchConfig, LinkConfig, NodeLink, fetch_chunks
    from gpu_runtime.store.readers import open_reader
    imported = time.time()
    out, link, source = Path(out_dir), NodeLink("baseline", LinkConfig(link_mb_s)), Source(uri)
    reader, config = open_reader(uri), FetchConfig()
    for name in files:
        size = source.size(name)
        with open(out / name, "w+b") as f:
            f.truncate(size)
            if size == 0:
                continue
            mm = mmap.mmap(f.fileno(), size)
            chunks = [Chunk(name, s, min(s + config.chunk_bytes, size), s)
                      for s in range(0, size, config.chunk_bytes)]
            view = memoryview(mm)
            fetch_chunks(reader, chunks, view, config=config, link=link)
            view.release()
            mm.close()
    downloaded = time.time()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device).eval()
    if device != "cpu":
        torch.cuda.synchronize(device)
    loaded = time.time()
    with torch.inference_mode():
        token = int(model(torch.tensor([PROMPT], device=device)).logits[0, -1].argmax())
    return {"start": started, "imports_end": imported, "download_end": downloaded,
            "load_end": loaded, "first_token": time.time(), "token": token}


def run_baseline(store_url: str, cfg: ColdBenchConfig, model_dir: Path, link: float,
                 threads: int, device: str = "cpu", dl_root: str = "/dev/shm") -> dict:
    files = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    dl = Path(dl_root) / f"hydra-baseline-{uuid.uuid4().hex[:8]}"  # its best case: tmpfs
    dl.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-child", json.dumps(
        {"uri": f"{store_url}/{cfg.name}", "files": files, "link_mb_s": link,
         "out_dir": str(dl), "threads": threads, "device": device})]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                              env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    finally:
        shutil.rmtree(dl, ignore_errors=True)
    assert proc.returncode == 0, f"baseline failed: {proc.stderr[-3000:]}"
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"launch": t0, **r, "ttft": r["first_token"] - t0}


# ---- ours ----------------------------------------------------------------------------------

class Cluster:
    """Emulated nodes: node k = a worker pool (kept across runs) and, per link setting, a
    prefetcher with that node's cap."""

    def __init__(self, num_nodes: int, threads: int, shm_dir: str, device: str = "cpu") -> None:
        from gpu_runtime.coldstart import WorkerPool, WorkerPoolConfig

        self.pools = [WorkerPool(WorkerPoolConfig(node_id=f"bench-n{k}", num_prestarted=1,
                                                  refill=False, num_threads=threads,
                                                  device=device))
                      for k in range(num_nodes)]
        self.prefetchers: list = []
        self.shm_dir, self.device = shm_dir, device
        for pool in self.pools:
            pool.wait_booted()

    def set_link(self, link_mb_s: float, pool_bytes: list[int]) -> None:
        from gpu_runtime.prefetch import PrefetchConfig, Prefetcher
        from gpu_runtime.store import LinkConfig

        self.close_prefetchers()
        self.prefetchers = [Prefetcher(PrefetchConfig(
            node_id=f"bench-n{k}-{uuid.uuid4().hex[:6]}", pool_bytes=size, shm_dir=self.shm_dir,
            link=LinkConfig(link_mb_s))) for k, size in enumerate(pool_bytes)]

    def refill(self) -> None:
        for pool in self.pools:
            pool.replenish()
        for pool in self.pools:
            pool.wait_booted()

    def close_prefetchers(self) -> None:
        for pf in self.prefetchers:
            pf.close()
        self.prefetchers = []

    def close(self) -> None:
        self.close_prefetchers()
        for pool in self.pools:
            pool.close(10)


def run_ours(cluster: Cluster, index, cfg: ColdBenchConfig, pp: int, threads: int,
             spawn: bool = False, warm_prefill: bool = False) -> dict:
    from gpu_runtime.coldstart import ColdStartGroup, WorkerPool, WorkerPoolConfig, plan_group
    from gpu_runtime.sampling import SamplingParams

    # started from scratch when the plan arrives (not forked from the fork server): the
    # variant measures a worker start with its imports on the critical path
    cold_pool = WorkerPool(WorkerPoolConfig(node_id="bench-spawn", num_prestarted=0,
                                            num_threads=threads, device=cluster.device,
                                            start_method="spawn")
                           ) if spawn else None
    pools = [cold_pool] if cold_pool else cluster.pools[:pp]
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    plan_time = time.time()
    plans = [replace(p, device=cluster.device) for p in plan_group(
        cfg.name, index, pp, kv_cache_bytes=cfg.kv_cache_bytes, num_threads=threads,
        plan_time=plan_time)]
    group = ColdStartGroup(list(zip(cluster.prefetchers[:pp], pools, strict=True)), plans)
    try:
        reports = group.wait_ready(900)
        result = group.generate([("cold", PROMPT, params)], 300)
        timeline = group.timeline().check()
        out = {"ttft": timeline.ttft, "token": result["outputs"]["cold"][0],
               "timeline": timeline.to_dict(), "summary": timeline.summary(),
               "prestarted": [s.prestarted for s in timeline.stages],
               "loads": [r.get("load") for r in reports]}  # per stage: bytes, h2d path
        if warm_prefill:  # the same prompt on the now warm engine: the bound's prefill (best of 3)
            times = []
            for k in range(3):
                sent = time.time()
                again = group.generate([(f"warm{k}", PROMPT, params)], 300)
                times.append(again["first_token"] - sent)
            out["warm_prefill_runs_s"] = times
            out["warm_prefill_s"] = min(times)
    finally:
        group.stop(30)
        if cold_pool is not None:
            cold_pool.close(10)
        for pf in cluster.prefetchers:
            pf.evict_idle()  # the next run starts from a cold cache
    return out


# ---- the run -------------------------------------------------------------------------------



def start_store(root: Path) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gpu_runtime.store.server", "--root",
                             str(root), "--port", str(port)], stdout=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            requests.head(url + "/x", timeout=1)
            return proc, url
        except requests.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"store server on port {port} did not start")


def pool_sizes(index, cfg: ColdBenchConfig) -> list[int]:
    """Bytes of each node's pool: its largest stage over the pipeline sizes benchmarked."""
    from gpu_runtime.coldstart import plan_group
    from gpu_runtime.prefetch.pool import EXTENT_ALIGN, extent_bytes
    from gpu_runtime.store import plan_stage

    sizes = [0] * max(cfg.pps)
    for pp in cfg.pps:
        for k, plan in enumerate(plan_group(cfg.name, index, pp)):
            need = extent_bytes(plan_stage(plan.entries).size) + EXTENT_ALIGN
            sizes[k] = max(sizes[k], -(-need // EXTENT_ALIGN) * EXTENT_ALIGN)
    return sizes


def run_all(cfg: ColdBenchConfig, cache: Path, threads: int, shm_dir: str,
            device: str = "cpu") -> dict:
    from bench.load import ensure_model
    from gpu_runtime.checkpoint import index_checkpoint
    from gpu_runtime.demo_model import DemoModelSpec

    over = () if cfg.num_layers == 22 else (("num_hidden_layers", cfg.num_layers),)
    model_dir = ensure_model(cache, cfg.name, DemoModelSpec("llama", "1b", "bfloat16",
                                                            overrides=over))
    store, url = start_store(cache)
    cluster = Cluster(max(cfg.pps), threads, shm_dir, device)
    try:
        index = index_checkpoint(f"{url}/{cfg.name}")  # at registration, with checksums
        sizes = pool_sizes(index, cfg)
        # the baseline downloads into /dev/shm, unless it is too small (a container's)
        room = shutil.disk_usage("/dev/shm").free > 2 * index.total_bytes
        dl_root = "/dev/shm" if room else shm_dir
        runs: dict = {}
        for link in cfg.links_mb_s:
            cluster.set_link(link, sizes)
            res: dict = {"sequential": run_baseline(url, cfg, model_dir, link, threads,
                                                    device, dl_root)}
            for pp in sorted(cfg.pps):
                res[f"pp{pp}"] = run_ours(cluster, index, cfg, pp, threads,
                                          warm_prefill=pp == 1)
                cluster.refill()
            if cfg.spawn_variant:
                res["pp1-spawn"] = run_ours(cluster, index, cfg, 1, threads, spawn=True)
            runs[f"{link:g}"] = res
            print(f"link {link:g} MB/s: " + ", ".join(
                f"{k} {v['ttft']:.2f}s" for k, v in res.items()), flush=True)
    finally:
        cluster.close()
        store.terminate()
    return {"model_bytes": index.total_bytes, "model_dir": str(model_dir), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write raw numbers and ratios here")
    ap.add_argument("--png", default=None, help="write the 100 MB/s timeline chart here")
    ap.add_argument("--quick", action="store_true",
                    help="4 layers (0.6 GB), 100 MB/s only, no spawn variant")
    ap.add_argument("--cache", default=os.environ.get("HYDRA_BENCH_CACHE", "/tmp/hydra-bench"))
    # one torch thread per process: on this 2-core machine shared with other jobs, a second
    # thread makes every small op wait on an OpenMP barrier for a descheduled core (a 16-token
    # prefill of the 1.1B model took 3.5 s with 2 threads, 0.25-0.29 s with 1); both sides
    # get the same setting
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shm-dir", default="/dev/shm", help="tmpfs of the node pools")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda:N: every stage on that GPU")
    ap.add_argument("--baseline-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--platform", action="store_true",
                    help="API-to-first-token through a local cluster (pp=4 and pp=1) against "
                         "the bare loading path and the sequential baseline, at 100 MB/s")
    args = ap.parse_args(argv)
    if args.baseline_child:  # the sequential baseline's own process
        print(json.dumps(baseline_child(**json.loads(args.baseline_child))))
        return 0
    if args.platform:
        return platform_main(args)
    from bench.coldstart_report import figures, plot_timeline, print_report
    from bench.load import shm_huge

    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    raw = run_all(cfg, Path(args.cache), args.threads, args.shm_dir, args.device)
    keys = figures(raw, cfg.links_mb_s)
    print_report(raw, keys)
    if args.png:
        plot_timeline(raw, min(cfg.links_mb_s), args.png)
    write_json(args.json, {"benchmark": "coldstart", "quick": args.quick, "config": asdict(cfg),
                           "env": environment(), "wall_s": time.perf_counter() - started,
                           "shm_dir": args.shm_dir, "shm_huge": shm_huge(args.shm_dir),
                           "device": args.device,
                           "command": " ".join([Path(sys.executable).name, *sys.argv]),
                           **raw, **keys})
    return 0


def platform_main(args) -> int:
    from bench.coldstart_platform import print_platform, run_platform
    from bench.load import ensure_model
    from gpu_runtime.demo_model import DemoModelSpec

    cfg = QUICK if args.quick else FULL
    over = () if cfg.num_layers == 22 else (("num_hidden_layers", cfg.num_layers),)
    cache = Path(args.cache)
    model_dir = ensure_model(cache, cfg.name, DemoModelSpec("llama", "1b", "bfloat16",
                                                            overrides=over))
    started = time.perf_counter()
    res = run_platform(cfg, cache, model_dir, args.threads, args.shm_dir)
    print_platform(res)
    write_json(args.json, {"benchmark": "coldstart-platform", "quick": args.quick,
                           "config": asdict(cfg), "env": environment(),
                           "wall_s": time.perf_counter() - started,
                           "command": " ".join([Path(sys.executable).name, *sys.argv]), **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
