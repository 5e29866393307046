"""Time per output token (TPOT) and prefill throughput: our engine against
``transformers.generate`` on the same random Llama checkpoint, pipeline (pp = 2) against
standalone, and the floor: one decode step's linear layers alone (every weight matrix times a
batch of hidden vectors of the same shape and dtype, by the engine's own linear kernel,
``gpu_runtime.layers.linear``; ``floor_flinear_ms`` is the same with plain ``F.linear``).

    python bench/tpot.py --json bench/results/tpot.json          # full: ~370M params
    python bench/tpot.py --quick --json /tmp/tpot.json            # small model, ~20 s
    python bench/tpot.py --device cuda --shape llama2-7b --json /tmp/tpot-gpu.json

``--shape`` builds a random model of that shape in memory on ``--device`` (no checkpoint
files: transformers initialises it there, our engine's stage aliases the same tensors), and
compares our engine, transformers and two floors, without the pipeline; ``--device`` alone
runs the usual comparison from checkpoint files on that device. On CUDA every side ends its
turn with a device synchronisation, so no side's queued kernels run in another's time. The
bandwidth floor is the bytes of those weight matrices over the device's measured memory
bandwidth (a device-to-device copy, counted as read plus write): what one decode step costs
if it did nothing but read each weight once.

All sides run interleaved, one decode step each in turn: ``generate`` calls a logits processor
once per token, and that processor runs one step of our standalone engine, one of our pipeline
and the floor measurements before handing back (its own time is excluded from transformers'
step). Neighbours' load therefore hits every side within milliseconds of each other. Ratios
are medians of per-step ratios of these adjacent measurements; absolute figures are the best
round's median. Ratios without a dtype suffix are the worst over the dtypes measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# every side of the comparison (our engine, its pipeline, transformers, the floor) runs with a
# short OpenMP spin, so one process's idle threads do not slow the next one's turn (pipeline.py)
for _key, _value in (("GOMP_SPINCOUNT", "20000"), ("KMP_BLOCKTIME", "1")):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, median, time_call, write_json  # noqa: E402
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model  # noqa: E402
from gpu_runtime.engine import EngineConfig, LLMEngine  # noqa: E402
from gpu_runtime.layers import linear  # noqa: E402
from gpu_runtime.sampling import SamplingParams  # noqa: E402

Sync = Callable[[], None]


@dataclass(frozen=True, slots=True)
class BenchConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    prompt_len: int
    new_tokens: int
    rounds: int
    batches: tuple[int, ...] = (1, 8)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")

    def __post_init__(self) -> None:
        assert self.new_tokens >= 3 and self.rounds >= 1, f"{self}"

    def overrides(self) -> tuple:
        return (("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_layers), ("num_attention_heads", self.num_heads),
                ("num_key_value_heads", self.num_heads), ("vocab_size", self.vocab_size),
                ("max_position_embeddings", 2048))

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        return self.num_layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


FULL = BenchConfig(1024, 2816, 24, 16, 32000, prompt_len=64, new_tokens=32, rounds=3)
QUICK = BenchConfig(512, 1408, 8, 8, 8000, prompt_len=32, new_tokens=12, rounds=2)
# --shape: random models built in memory on the device (bf16; Llama-2-7B: 6.7B parameters)
SHAPES = {
    "llama2-7b": BenchConfig(4096, 11008, 32, 32, 32000, prompt_len=64, new_tokens=32, rounds=3,
                             dtypes=("bfloat16",)),
    "quick": replace(QUICK, dtypes=("bfloat16",)),
}


def ensure_model(cfg: BenchConfig, cache: Path) -> Path:
    out = cache / f"llama-h{cfg.hidden_size}-l{cfg.num_layers}-v{cfg.vocab_size}"
    if not (out / "config.json").exists():
        make_demo_model(out, DemoModelSpec("llama", "small", init_std=0.02,
                                           overrides=cfg.overrides()))
    return out


def make_prompts(batch: int, cfg: BenchConfig) -> list[list[int]]:
    return [[1] + [(31 * i + 17 * j) % (cfg.vocab_size - 3) + 3 for j in range(cfg.prompt_len - 1)]
            for i in range(batch)]


def measure_round(engines: list[LLMEngine], hf, prompts: list[list[int]], new_tokens: int,
                  floors: dict[str, Callable[[], None]],
                  sync: Sync = lambda: None) -> dict[str, list[float]]:
    """One batch through transformers and every engine, interleaved step by step (see the
    module docstring). Returns per-side lists: prefill seconds first, then decode steps.
    ``sync`` ends each side's turn (a device synchronisation on CUDA)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    tag = time.perf_counter_ns()
    for engine in engines:
        for i, p in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", p, params)
    times: dict[str, list[float]] = {"hf": [], **{k: [] for k in floors},
                                     **{f"e{i}": [] for i in range(len(engines))}}

    def timed(key: str, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        fn()
        sync()
        times[key].append(time.perf_counter() - start)

    class Interleave(LogitsProcessor):
        last = 0.0  # when this processor last handed control back to generate

        def __call__(self, input_ids, scores):
            sync()
            times["hf"].append(time.perf_counter() - self.last)
            for i, engine in enumerate(engines):
                timed(f"e{i}", engine.step)
            for key, floor in floors.items():
                timed(key, floor)
            self.last = time.perf_counter()
            return scores

    ids = torch.tensor(prompts, device=hf.device)
    clock = Interleave()
    with torch.inference_mode():
        clock.last = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    logits_processor=LogitsProcessorList([clock]))
    assert not any(e.has_unfinished() for e in engines), "engines did not finish the batch"
    assert all(len(v) == new_tokens for v in times.values()), {k: len(v) for k, v in
                                                                times.items()}
    return times


def linear_weights(engine: LLMEngine) -> list[torch.Tensor]:
    """Every matrix a decode step multiplies by: projections, MLP and the LM head (fused
    projections once, not also as the views their parts became: ``layers.FusedLinear``)."""
    params = dict(engine.runner.stage.model.named_parameters())
    fused = {name.rsplit(".", 2)[0] for name in params
             if name.endswith((".qkv.weight", ".gate_up.weight"))}
    return [p for name, p in params.items() if p.dim() == 2 and "embed" not in name
            and not (name.endswith(FUSED_PARTS) and name.rsplit(".", 2)[0] in fused)]


FUSED_PARTS = tuple(f".{n}_proj.weight" for n in ("q", "k", "v", "gate", "up"))


def floor_fn(weights: list[torch.Tensor], batch: int,
             kernel: Callable = linear) -> Callable[[], None]:
    """One decode step's linear layers alone: each weight matrix times ``batch`` hidden vectors
    of its input width, same dtype, by ``kernel`` (the engine's own, or ``F.linear``)."""
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype, device=w.device)
              for w in weights}

    @torch.inference_mode()
    def step() -> None:
        for w in weights:
            kernel(inputs[w.shape[1]], w)

    return step


def floors(weights: list[torch.Tensor], batch: int) -> dict[str, Callable[[], None]]:
    return {"floor": floor_fn(weights, batch), "floor_flinear": floor_fn(weights, batch, F.linear)}


def pipeline_counters(engine: LLMEngine) -> tuple[float, float, int]:
    """(stage 0's wait seconds, other stages' compute seconds, steps) so far."""
    stats = engine.runner.stats()
    return engine.runner.wait_s, sum(s["compute_s"] for s in stats), stats[0]["steps"]


def hop_overhead_s(before: tuple, after: tuple, pp: int) -> float:
    """Per hop, per step: what stage 0 waited beyond the other stages' compute. Covers encode,
    send, receive, decode and wake-up latency of every hop in the ring (pp hops per step)."""
    wait, compute, steps = (a - b for a, b in zip(after, before, strict=True))
    return (wait - compute) / steps / pp


def run_dtype(dtype: str, cfg: BenchConfig, model_dir: Path, threads: int, pp: int,
              device: str = "cpu", sync: Sync = lambda: None, bandwidth: bool = False) -> dict:
    """Our engine, our pp-stage pipeline and transformers from the checkpoint ``model_dir``."""
    from transformers import AutoModelForCausalLM

    kv_bytes = 256 * 2**20
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype=dtype, device=device,
                                    kv_cache_bytes=kv_bytes))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    hf = hf.to(device).eval()
    piped = LLMEngine(EngineConfig(model=str(model_dir), dtype=dtype, device=device, pp=pp,
                                   kv_cache_bytes=kv_bytes, num_threads=threads))
    try:
        return measure(cfg, engine, hf, piped, pp, sync, bandwidth)
    finally:
        piped.close()
        engine.close()


def measure(cfg: BenchConfig, engine: LLMEngine, hf, piped: LLMEngine | None, pp: int,
            sync: Sync, bandwidth: bool) -> dict:
    """A warm-up, then ``cfg.rounds`` interleaved rounds of every batch size; by batch."""
    engines = [engine] if piped is None else [engine, piped]
    weights = linear_weights(engine)
    rounds: dict[int, list[dict]] = {b: [] for b in cfg.batches}
    hops: dict[int, list[float]] = {b: [] for b in cfg.batches}
    for b in cfg.batches:  # warm-up: first calls allocate and pick kernels
        measure_round(engines, hf, make_prompts(b, cfg), 3, floors(weights, b), sync)
    for _ in range(cfg.rounds):
        for b in cfg.batches:
            before = pipeline_counters(piped) if piped is not None else ()
            rounds[b].append(measure_round(engines, hf, make_prompts(b, cfg), cfg.new_tokens,
                                           floors(weights, b), sync))
            if piped is not None:
                hops[b].append(hop_overhead_s(before, pipeline_counters(piped), pp))
    extra: dict = {}
    if bandwidth:  # each weight matrix read once, at the device's memory bandwidth
        weight_bytes = sum(w.nbytes for w in weights)
        bytes_s = memory_bandwidth(weights[0].device, sync)
        extra = {"floor_bandwidth_ms": 1e3 * weight_bytes / bytes_s,
                 "memory_gb_s": bytes_s / 1e9, "weight_bytes": weight_bytes}
    return {f"b{b}": summarise(rounds[b], hops[b], b * cfg.prompt_len) | extra
            for b in cfg.batches}


def memory_bandwidth(device: torch.device, sync: Sync, nbytes: int = 1 << 30) -> float:
    """Bytes per second the device's memory moves in a copy of ``nbytes`` within it, read
    and write both counted (best of 5)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)
        sync()

    return 2 * nbytes / min(time_call(copy, repeats=5, warmup=2))


def run_in_memory(dtype: str, cfg: BenchConfig, device: str, sync: Sync) -> dict:
    """Our engine and transformers on one random model in memory (no pipeline)."""
    from bench.random_llama import random_engine

    engine, hf = random_engine(cfg, dtype, device)
    try:
        return measure(cfg, engine, hf, None, 1, sync, bandwidth=True)
    finally:
        engine.close()
        del engine, hf
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def summarise(rounds: list[dict], hops: list[float], prompt_tokens: int) -> dict:
    """Absolute figures: best round's median. Ratios: median over every decode step of the
    ratio of adjacent measurements."""
    sides = {name: key for name, key in (("ours", "e0"), ("pp", "e1"), ("transformers", "hf"))
             if key in rounds[0]}

    def best_ms(key: str) -> float:
        return 1e3 * min(median(r[key][1:]) for r in rounds)

    out: dict = {f"{name}_tpot_ms": best_ms(key) for name, key in sides.items()}
    out |= {f"{key}_ms": best_ms(key) for key in ("floor", "floor_flinear")}
    for name, key in sides.items():
        out[f"{name}_prefill_tok_s"] = prompt_tokens / min(r[key][0] for r in rounds)
    if hops:
        out["hop_overhead_ms"] = 1e3 * median(hops)

    def paired(a: str, b: str) -> float:
        return median([x / y for r in rounds for x, y in zip(r[a][1:], r[b][1:], strict=True)])

    out["paired"] = {"ours_vs_transformers": paired("e0", "hf"),
                     "ours_vs_floor": paired("e0", "floor"),
                     "transformers_vs_floor": paired("hf", "floor"),
                     "floor_vs_flinear": paired("floor", "floor_flinear")}
    if "pp" in sides:
        out["paired"]["pp_vs_ours"] = paired("e1", "e0")
    out["raw_ms"] = [{k: [round(1e3 * t, 3) for t in v] for k, v in r.items()} for r in rounds]
    if hops:
        out["hop_overhead_ms_rounds"] = [1e3 * h for h in hops]
    return out


def ratios(results: dict[str, dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for dtype, res in results.items():
        for b in (1, 8):
            r = res.get(f"b{b}")
            if r is None:
                continue
            p = r["paired"]
            out[f"ratio_vs_transformers_b{b}_{dtype}"] = p["ours_vs_transformers"]
            out[f"ratio_vs_floor_b{b}_{dtype}"] = p["ours_vs_floor"]
            if "pp_vs_ours" in p:
                out[f"ratio_pp2_vs_standalone_b{b}_{dtype}"] = p["pp_vs_ours"]
            out[f"transformers_vs_floor_b{b}_{dtype}"] = p["transformers_vs_floor"]
            out[f"floor_vs_flinear_b{b}_{dtype}"] = p["floor_vs_flinear"]
            if "floor_bandwidth_ms" in r:  # of the best rounds' medians, not step by step
                out[f"ratio_vs_bandwidth_floor_b{b}_{dtype}"] = (r["ours_tpot_ms"]
                                                                 / r["floor_bandwidth_ms"])
                out[f"transformers_vs_bandwidth_floor_b{b}_{dtype}"] = (
                    r["transformers_tpot_ms"] / r["floor_bandwidth_ms"])
    for key in ("ratio_vs_transformers_b1", "ratio_vs_transformers_b8", "ratio_vs_floor_b1",
                "ratio_vs_floor_b8", "ratio_vs_bandwidth_floor_b1",
                "ratio_vs_bandwidth_floor_b8"):
        worst = [v for k, v in out.items() if k.startswith(key + "_")]
        if worst:
            out[key] = max(worst)
    pp = [v for k, v in out.items() if k.startswith("ratio_pp2_vs_standalone_b1_")]
    if pp:
        out["ratio_pp2_vs_standalone"] = max(pp)
    return out


def print_report(results: dict, rat: dict) -> None:
    rows = []
    for dtype, res in results.items():
        for b, r in res.items():
            rows.append({"dtype": dtype, "batch": b[1:], **{k: v for k, v in r.items()
                                                            if not isinstance(v, dict | list)}})
    cols = ["dtype", "batch", "ours_tpot_ms", "transformers_tpot_ms", "floor_ms",
            "floor_flinear_ms", "floor_bandwidth_ms", "pp_tpot_ms",
            "hop_overhead_ms", "ours_prefill_tok_s", "transformers_prefill_tok_s"]
    print(markdown_table(rows, [c for c in cols if any(c in r for r in rows)]))
    print()
    print(markdown_table([{"ratio": k, "value": v} for k, v in sorted(rat.items())],
                         ["ratio", "value"], "{:.3f}"))


def bench_config(args: argparse.Namespace) -> BenchConfig:
    """The shape asked for, with the command line's rounds, dtypes and layers."""
    cfg = SHAPES[args.shape] if args.shape else QUICK if args.quick else FULL
    changes = {k: v for k, v in (("rounds", args.rounds), ("num_layers", args.layers)) if v}
    if args.dtypes:
        changes["dtypes"] = tuple(args.dtypes.split(","))
    return replace(cfg, **changes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write raw numbers and ratios here")
    ap.add_argument("--quick", action="store_true", help="small model, fewer rounds")
    ap.add_argument("--cache", default=os.environ.get("HYDRA_BENCH_CACHE", "/tmp/hydra-bench"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--dtypes", default=None, help="comma list, e.g. float32,bfloat16")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where every side runs")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="a random model of this shape, made in memory on --device (no files, "
                         "no pipeline)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers of the shape")
    args = ap.parse_args(argv)
    cfg = bench_config(args)
    device = torch.device(args.device)
    sync: Sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (
        lambda: None)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = (f"random Llama {args.shape or 'quick'}-shaped: hidden {cfg.hidden_size}, "
             f"{cfg.num_layers} layers, {cfg.num_heads} heads, intermediate "
             f"{cfg.intermediate_size}, vocab {cfg.vocab_size}, {cfg.num_params / 1e9:.2f}B "
             f"parameters, on {args.device}")
    if args.shape:
        full = SHAPES[args.shape].num_layers
        model += (" (in memory, no checkpoint files" + (
            f"; {cfg.num_layers} of the shape's {full} layers)" if cfg.num_layers != full
            else ")"))
        results = {d: run_in_memory(d, cfg, args.device, sync) for d in cfg.dtypes}
    else:
        model_dir = ensure_model(cfg, Path(args.cache))
        results = {d: run_dtype(d, cfg, model_dir, args.threads, 2, args.device, sync,
                                bandwidth=device.type != "cpu") for d in cfg.dtypes}
    rat = ratios(results)
    print(f"model: {model}\n")
    print_report(results, rat)
    write_json(args.json, {"benchmark": "tpot", "quick": args.quick, "config": asdict(cfg),
                           "num_params": cfg.num_params, "device": args.device,
                           "shape": args.shape, "model": model, "env": environment(),
                           "wall_s": time.perf_counter() - started, "results": results, **rat})
    return 0


if __name__ == "__main__":
    sys.exit(main())
