"""Time per output token (TPOT) and prefill throughput: our engine against
``transformers.generate`` on the same random Llama checkpoint, pipeline (pp = 2) against
standalone, and the floor: one decode step's linear layers alone (every weight matrix times a
batch of hidden vectors of the same shape and dtype).

    python bench/tpot.py --json bench/results/tpot.json          # full: ~370M params
    python bench/tpot.py --quick --json /tmp/tpot.json            # small model, ~2 minutes

Our standalone engine, our pipeline and the floor are interleaved step by step (one decode step
of each in turn), so all three see the same load from neighbours; transformers runs between
them in each round. Each figure is the best round's median. Ratios without a dtype suffix are
the worst over the dtypes measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, median, write_json  # noqa: E402
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model  # noqa: E402
from gpu_runtime.engine import EngineConfig, LLMEngine  # noqa: E402
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


def measure_interleaved(engines: list[LLMEngine], prompts: list[list[int]], new_tokens: int,
                        floor: Callable[[], None]) -> dict:
    """Runs the same batch on every engine, stepping them in turn, with one floor measurement
    after each round of steps, so all sides see the same neighbours' load. Returns prefill
    seconds per engine and decode-step seconds per engine and for the floor (lists)."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    tag = time.perf_counter_ns()
    for engine in engines:
        for i, p in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", p, params)
    steps: list[list[float]] = [[] for _ in engines]
    floors: list[float] = []
    for _ in range(new_tokens):
        for engine, times in zip(engines, steps, strict=True):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        floor()
        floors.append(time.perf_counter() - start)
    assert not any(e.has_unfinished() for e in engines), "engines did not finish the batch"
    return {"prefill": [t[0] for t in steps], "decode": [t[1:] for t in steps],
            "floor": floors[1:]}


def measure_hf(model, prompts: list[list[int]], new_tokens: int) -> tuple:
    """(prefill seconds, median decode-step seconds) of one ``generate`` call. A logits
    processor stamps the clock each time generate asks for a token, so consecutive stamps are
    one whole decode step of generate (forward, cache update, processors, stopping checks)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts)
    clock = StepClock()
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       logits_processor=LogitsProcessorList([clock]))
    stamps = clock.stamps
    assert len(stamps) == new_tokens, f"{len(stamps)} steps for {new_tokens} tokens"
    return stamps[0] - start, median([b - a for a, b in pairwise(stamps)])


def linear_weights(engine: LLMEngine) -> list[torch.Tensor]:
    """Every matrix a decode step multiplies by: projections, MLP and the LM head."""
    return [p for name, p in engine.runner.stage.model.named_parameters()
            if p.dim() == 2 and "embed" not in name]


def floor_fn(weights: list[torch.Tensor], batch: int) -> Callable[[], None]:
    """One decode step's linear layers alone: each weight matrix times ``batch`` hidden vectors
    of its input width, same dtype."""
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}

    @torch.inference_mode()
    def step() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    return step


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
    samples: dict[str, list] = {}
    try:
        for b in cfg.batches:  # warm-up: first calls allocate and pick kernels
            measure_interleaved([engine, piped], make_prompts(b, cfg), 3, floor_fn(weights, b))
        for _ in range(cfg.rounds):
            for b in cfg.batches:
                prompts = make_prompts(b, cfg)
                before = pipeline_counters(piped)
                run = measure_interleaved([engine, piped], prompts, cfg.new_tokens,
                                          floor_fn(weights, b))
                after = pipeline_counters(piped)
                add = samples.setdefault
                add(f"ours_b{b}", []).append((run["prefill"][0], median(run["decode"][0])))
                add(f"pp_b{b}", []).append((run["prefill"][1], median(run["decode"][1])))
                add(f"floor_b{b}", []).append(median(run["floor"]))
                add(f"hop_b{b}", []).append(hop_overhead_s(before, after, pp))
                add(f"hf_b{b}", []).append(measure_hf(hf, prompts, cfg.new_tokens))
    finally:
        piped.close()
        engine.close()
    return summarise(samples, cfg)


def summarise(samples: dict[str, list], cfg: BenchConfig) -> dict:
    """Per batch size: the best round's median for each side (see the module docstring)."""
    out: dict[str, dict] = {}
    for b in cfg.batches:
        ours, hf, pp = samples[f"ours_b{b}"], samples[f"hf_b{b}"], samples[f"pp_b{b}"]
        tokens = b * cfg.prompt_len
        out[f"b{b}"] = {
            "ours_tpot_ms": 1e3 * min(t for _, t in ours),
            "transformers_tpot_ms": 1e3 * min(t for _, t in hf),
            "floor_ms": 1e3 * min(samples[f"floor_b{b}"]),
            "pp_tpot_ms": 1e3 * min(t for _, t in pp),
            "hop_overhead_ms": 1e3 * min(samples[f"hop_b{b}"]),
            "ours_prefill_tok_s": tokens / min(p for p, _ in ours),
            "transformers_prefill_tok_s": tokens / min(p for p, _ in hf),
            "pp_prefill_tok_s": tokens / min(p for p, _ in pp),
            "raw": {k: samples[f"{k}_b{b}"] for k in ("ours", "hf", "floor", "pp", "hop")},
        }
    return out


def ratios(results: dict[str, dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for dtype, res in results.items():
        for b in (1, 8):
            r = res.get(f"b{b}")
            if r is None:
                continue
            out[f"ratio_vs_transformers_b{b}_{dtype}"] = r["ours_tpot_ms"] / r[
                "transformers_tpot_ms"]
            out[f"ratio_vs_floor_b{b}_{dtype}"] = r["ours_tpot_ms"] / r["floor_ms"]
            out[f"ratio_pp2_vs_standalone_b{b}_{dtype}"] = r["pp_tpot_ms"] / r["ours_tpot_ms"]
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
                                                            if k != "raw"}})
    cols = ["dtype", "batch", "ours_tpot_ms", "transformers_tpot_ms", "floor_ms", "pp_tpot_ms",
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
