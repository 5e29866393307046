"""Host-to-device loading from the node cache (``bench/load.py --device cuda``): our loader on
its registered path and on its staged path, against plain copies of the same bytes.

- pinned: ``dst.copy_(src, non_blocking=True)`` of one page-locked tensor holding the stage's
  bytes into a device tensor allocated beforehand: the bus's best case;
- pageable: the same copy straight from the mapped cache, not page-locked (the driver stages it);
- registered / staged: ``build_stage`` on ``meta`` + ``stream_into`` onto the device with
  ``CopyConfig(h2d="auto")`` / ``CopyConfig(h2d="staged")``: registering (or trying to register)
  the mapping, allocating every parameter on the device and the copies, until the last one
  ended. Which path each load took is recorded (``h2d``), and the part of its time spent
  choosing it (``setup_s``: registering 2 GB page by page is not free; in a cold start it
  happens as the fetch begins, behind the download).

One fresh spawned process runs every round: it boots as a worker does (device context, staging
slots where needed, the ``meta`` path warmed) and maps the buffer before any clock starts; a
warm-up round is not counted, and the device's cached memory is given back before each
measurement, so each load allocates as a fresh worker's does. Rounds interleave the methods.
"""

from __future__ import annotations

import argparse
import time
from statistics import median

from bench.common import environment, in_child, markdown_table, write_json
from gpu_runtime.checkpoint import TensorEntry
from gpu_runtime.limits import GB
from gpu_runtime.store.ranges import TensorPlacement

METHODS = ("pinned", "pageable", "registered", "staged")


def _methods(job: dict, device, keep: list) -> dict:
    """Each method as a callable that returns once its bytes are on the device."""
    import torch

    from gpu_runtime.coldstart import CopyConfig, StreamConfig, stream_into
    from gpu_runtime.config import parse_config
    from gpu_runtime.prefetch import open_buffer
    from gpu_runtime.stage import build_stage

    is_cuda = device.type == "cuda"
    buffer = open_buffer(job["handle"], populate=True)
    whole = TensorPlacement(TensorEntry("all", "U8", (job["size"],), "", 0, job["size"]), 0)
    src = buffer.tensor(whole)  # (size,) uint8 view of the mapped cache
    pinned = torch.empty(job["size"], dtype=torch.uint8, pin_memory=is_cuda)
    pinned.copy_(src)
    dst = torch.empty(job["size"], dtype=torch.uint8, device=device)
    config = parse_config(job["config"])
    keep.extend([buffer, src, pinned, dst])

    def load(h2d: str) -> dict:
        stage = build_stage(config, job["spec"], torch.bfloat16, device)
        stats = stream_into(stage, buffer, job["layout"], StreamConfig(copy=CopyConfig(h2d=h2d)))
        return {"h2d": stats.h2d, "setup_s": stats.h2d_setup_s}

    return {"pinned": lambda: dst.copy_(pinned, non_blocking=True),
            "pageable": lambda: dst.copy_(src, non_blocking=True),
            "registered": lambda: load("auto"), "staged": lambda: load("staged")}


def child(conn, job: dict) -> None:
    """Every round of every method, in this (fresh) process; sends the figures back."""
    import torch

    from gpu_runtime.coldstart import CopyConfig
    from gpu_runtime.coldstart.runtime import init_device

    device = torch.device(job["device"])
    boot_s = init_device(device, job["threads"])  # as a worker boots: context, staging slots
    if device.type == "cuda":
        from gpu_runtime.coldstart.cuda_copy import prepare_staging

        prepare_staging(device, CopyConfig(h2d="staged"))  # the staged loads' slots, at boot

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    keep: list = []
    methods = _methods(job, device, keep)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for round_ in range(job["repeats"] + 1):  # round 0: warm-up, not counted
        for name in METHODS:
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the load allocates as a fresh worker's does
            sync()
            start = time.perf_counter()
            done = methods[name]()
            sync()
            if round_:
                runs[name].append({"seconds": time.perf_counter() - start}
                                  | (done if isinstance(done, dict) else {"h2d": None}))
    conn.send({"boot_s": boot_s, "runs": runs})
    del keep


def measure_all(job: dict) -> dict:
    return in_child(child, (job,), "host-to-device")


def summarise(runs: dict[str, list[dict]], nbytes: int) -> dict:
    out: dict = {"methods": {}}
    for name, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        out["methods"][name] = {"seconds": secs, "median_s": median(secs), "best_s": min(secs),
                                "gb_per_s": nbytes / median(secs) / GB,
                                "h2d": sorted({str(r["h2d"]) for r in rs if r["h2d"]})}
        if "setup_s" in rs[0]:  # registering the mapping (or trying to), inside seconds
            out["methods"][name]["setup_s"] = [r["setup_s"] for r in rs]
    m = out["methods"]
    for name in ("registered", "staged", "pageable"):  # >= 1: as fast as the pinned copy
        out[f"{name}_vs_pinned"] = m["pinned"]["median_s"] / m[name]["median_s"]
    out["h2d_registered"] = "; ".join(m["registered"]["h2d"]) or None
    out["h2d_staged"] = "; ".join(m["staged"]["h2d"]) or None
    return out


def print_report(summary: dict, nbytes: int, device: str) -> None:
    rows = [{"method": k, "median s": v["median_s"], "best s": v["best_s"], "GB/s": v["gb_per_s"],
             "setup s": median(v["setup_s"]) if "setup_s" in v else None,
             "path": ", ".join(v["h2d"])} for k, v in summary["methods"].items()]
    print(f"\nhost-to-device: {nbytes / GB:.2f} GB of bf16 weights from the node cache to "
          f"{device}\n")
    print(markdown_table(rows, ["method", "median s", "best s", "GB/s", "setup s", "path"],
                         "{:.3f}"))
    print(f"\nregistered_vs_pinned {summary['registered_vs_pinned']:.2f}, staged_vs_pinned "
          f"{summary['staged_vs_pinned']:.2f}, pageable_vs_pinned "
          f"{summary['pageable_vs_pinned']:.2f} (1 = as fast as a copy of pinned memory)")


def run_h2d(args: argparse.Namespace, cfg, job: dict, started: float) -> int:
    """``load.py --device``: the methods above on ``args.device``; prints and writes JSON."""
    result = measure_all(job | {"device": args.device, "repeats": cfg.repeats})
    summary = summarise(result["runs"], job["size"])
    print_report(summary, job["size"], args.device)
    write_json(args.json, {"benchmark": "load-h2d", "device": args.device, "quick": args.quick,
                           "config": {"num_layers": cfg.num_layers, "repeats": cfg.repeats},
                           "bytes": job["size"], "model_bytes": job["model_bytes"],
                           "worker_boot_s": result["boot_s"], "shm_dir": args.shm_dir,
                           "env": environment(), "wall_s": time.perf_counter() - started,
                           **summary})
    return 0
