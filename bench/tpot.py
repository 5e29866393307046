"""Time per output token (TPOT) and prefill throughput: our engine against
``transformers.generate`` on the same random Llama checkpoint, pipeline (pp = 2) against
standalone, and the floor: one decode step's linear layers alone (every weight matrix times a
batch of hidden vectors of the same shape and dtype, by the engine's own linear kernel,
``gpu_runtime.layers.linear``; ``floor_flinear_ms`` is the same with plain ``F.linear``).

    python bench/tpot.py --json bench/results/tpot.json          # full: ~370M params
    python bench/tpot.py --quick --json /tmp/tpot.json            # small model, ~20 s

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
from dataclasses import asdict, dataclass
from pathlib import Path

# every side of the comparison (our engine, its pipeline, transformers, the floor) runs with a
# short OpenMP spin, so one process's idle threads do not slow the next one's turn (pipeline.py)
for _key, _value in (("GOMP_SPINCOUNT", "20000"), ("KMP_BLOCKTIME", "1")):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, median, write_json  # noqa: E402
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model  # noqa: E402
from gpu_runtime.engine import EngineConfig, LLMEngine  # noqa: E402
from gpu_runtime.layers import linear  # noqa: E402
from gpu_runtime.sampling import SamplingParams  # noqa: E402


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
                  floors: dict[str, Callable[[], None]]) -> dict[str, list[float]]:
    """One batch through transformers and every engine, interleaved step by step (see the
    module docstring). Returns per-side lists: prefill seconds first, then decode steps."""
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
        times[key].append(time.perf_counter() - start)

    class Interleave(LogitsProcessor):
        last = 0.0  # when this processor last handed control back to generate

        def __call__(self, input_ids, scores):
            times["hf"].append(time.perf_counter() - self.last)
            for i, engine in enumerate(engines):
                timed(f"e{i}", engine.step)
            for key, floor in floors.items():
                timed(key, floor)
            self.last = time.perf_counter()
            return scores

    ids = torch.tensor(prompts)
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
    """Every matrix a decode step multiplies by: projections, MLP and the LM head."""
    return [p for name, p in engine.runner.stage.model.named_parameters()
            if p.dim() == 2 and "embed" not in name]


def floor_fn(weights: list[torch.Tensor], batch: int,
             kernel: Callable = linear) -> Callable[[], None]:
    """One decode step's linear layers alone: each weight matrix times ``batch`` hidden vectors
    of its input width, same dtype, by ``kernel`` (the engine's own, or ``F.linear``)."""
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}

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


def run_dtype(dtype: str, cfg: BenchConfig, model_dir: Path, threads: int, pp: int) -> dict:
    from transformers import AutoModelForCausalLM

    kv_bytes = 256 * 2**20
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype=dtype, device="cpu",
                                    kv_cache_bytes=kv_bytes))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    piped = LLMEngine(EngineConfig(model=str(model_dir), dtype=dtype, device="cpu", pp=pp,
                                   kv_cache_bytes=kv_bytes, num_threads=threads))
    weights = linear_weights(engine)
    rounds: dict[int, list[dict]] = {b: [] for b in cfg.batches}
    hops: dict[int, list[float]] = {b: [] for b in cfg.batches}
    try:
        for b in cfg.batches:  # warm-up: first calls allocate and pick kernels
            measure_round([engine, piped], hf, make_prompts(b, cfg), 3, floors(weights, b))
        for _ in range(cfg.rounds):
            for b in cfg.batches:
                before = pipeline_counters(piped)
                rounds[b].append(measure_round([engine, piped], hf, make_prompts(b, cfg),
                                               cfg.new_tokens, floors(weights, b)))
                hops[b].append(hop_overhead_s(before, pipeline_counters(piped), pp))
    finally:
        piped.close()
        engine.close()
    return {f"b{b}": summarise(rounds[b], hops[b], b * cfg.prompt_len) for b in cfg.batches}


def summarise(rounds: list[dict], hops: list[float], prompt_tokens: int) -> dict:
    """Absolute figures: best round's median. Ratios: median over every decode step of the
    ratio of adjacent measurements."""
    sides = {"ours": "e0", "pp": "e1", "transformers": "hf"}

    def best_ms(key: str) -> float:
        return 1e3 * min(median(r[key][1:]) for r in rounds)

    out: dict = {f"{name}_tpot_ms": best_ms(key) for name, key in sides.items()}
    out |= {f"{key}_ms": best_ms(key) for key in ("floor", "floor_flinear")}
    for name, key in sides.items():
        out[f"{name}_prefill_tok_s"] = prompt_tokens / min(r[key][0] for r in rounds)
    out["hop_overhead_ms"] = 1e3 * median(hops)

    def paired(a: str, b: str) -> float:
        return median([x / y for r in rounds for x, y in zip(r[a][1:], r[b][1:], strict=True)])

    out["paired"] = {"ours_vs_transformers": paired("e0", "hf"),
                     "ours_vs_floor": paired("e0", "floor"), "pp_vs_ours": paired("e1", "e0"),
                     "transformers_vs_floor": paired("hf", "floor"),
                     "floor_vs_flinear": paired("floor", "floor_flinear")}
    out["raw_ms"] = [{k: [round(1e3 * t, 3) for t in v] for k, v in r.items()} for r in rounds]
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
            out[f"ratio_pp2_vs_standalone_b{b}_{dtype}"] = p["pp_vs_ours"]
            out[f"transformers_vs_floor_b{b}_{dtype}"] = p["transformers_vs_floor"]
            out[f"floor_vs_flinear_b{b}_{dtype}"] = p["floor_vs_flinear"]
    for key in ("ratio_vs_transformers_b1", "ratio_vs_transformers_b8", "ratio_vs_floor_b1",
                "ratio_vs_floor_b8"):
        out[key] = max(v for k, v in out.items() if k.startswith(key + "_"))
    out["ratio_pp2_vs_standalone"] = max(
        v for k, v in out.items() if k.startswith("ratio_pp2_vs_standalone_b1_"))
    return out


def print_report(results: dict, rat: dict) -> None:
    rows = []
    for dtype, res in results.items():
        for b, r in res.items():
            rows.append({"dtype": dtype, "batch": b[1:], **{k: v for k, v in r.items()
                                                            if not isinstance(v, dict | list)}})
    cols = ["dtype", "batch", "ours_tpot_ms", "transformers_tpot_ms", "floor_ms",
            "floor_flinear_ms", "pp_tpot_ms",
            "hop_overhead_ms", "ours_prefill_tok_s", "transformers_prefill_tok_s"]
    print(markdown_table(rows, cols))
    print()
    print(markdown_table([{"ratio": k, "value": v} for k, v in sorted(rat.items())],
                         ["ratio", "value"], "{:.3f}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write raw numbers and ratios here")
    ap.add_argument("--quick", action="store_true", help="small model, fewer rounds")
    ap.add_argument("--cache", default=os.environ.get("HYDRA_BENCH_CACHE", "/tmp/hydra-bench"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--dtypes", default=None, help="comma list, e.g. float32,bfloat16")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.rounds or args.dtypes:
        cfg = BenchConfig(**(asdict(cfg) | ({"rounds": args.rounds} if args.rounds else {})
                             | ({"dtypes": tuple(args.dtypes.split(","))} if args.dtypes else {})))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_dir = ensure_model(cfg, Path(args.cache))
    results = {dtype: run_dtype(dtype, cfg, model_dir, args.threads, pp=2) for dtype in cfg.dtypes}
    rat = ratios(results)
    print_report(results, rat)
    write_json(args.json, {"benchmark": "tpot", "quick": args.quick, "config": asdict(cfg),
                           "num_params": cfg.num_params, "env": environment(),
                           "wall_s": time.perf_counter() - started, "results": results, **rat})
    return 0


if __name__ == "__main__":
    sys.exit(main())
