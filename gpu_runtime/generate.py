"""Stable command line for tests, benchmarks and outside checks.

    python -m gpu_runtime.generate --model DIR --prompt-ids 1,2,3 [--prompt-ids 4,5 ...] \
        --max-new-tokens N [--pp K] [--dtype float32|bfloat16|float16] --json

Greedy decoding; a prompt stops early only at the model's EOS token. With ``--json`` the last
stdout line is ``{"token_ids": [[...], ...], "logprobs": [[...], ...]}``, one list per prompt.
With ``--pp K`` the model runs as K stage processes (this one is stage 0) over the channel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# before torch loads (config imports it): stages share this machine's cores, see pipeline.py
for _key, _value in (("GOMP_SPINCOUNT", "20000"), ("KMP_BLOCKTIME", "1")):
    os.environ.setdefault(_key, _value)

from gpu_runtime.config import DTYPES  # noqa: E402
from gpu_runtime.engine import EngineConfig, LLMEngine  # noqa: E402
from gpu_runtime.errors import RuntimeInputError  # noqa: E402
from gpu_runtime.sampling import SamplingParams  # noqa: E402


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r}: comma-separated ints") from exc


def generate(engine: LLMEngine, prompts: list[list[int]],
             params: SamplingParams) -> tuple[list[list[int]], list[list[float]]]:
    """Runs every prompt to completion in one continuous batch."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    while engine.has_unfinished():
        for out in engine.step():
            tokens[int(out.request_id)] += out.new_token_ids
            logprobs[int(out.request_id)] += out.new_logprobs
    return tokens, logprobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Greedy generation with the HydraServe engine.")
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--prompt-ids", type=parse_ids, action="append", required=True)
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (processes), 1..4")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--kv-cache-mb", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print the JSON result line")
    args = ap.parse_args(argv)
    try:
        params = SamplingParams(max_tokens=args.max_new_tokens)
        config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, pp=args.pp,
                              kv_cache_bytes=args.kv_cache_mb * 2**20,
                              num_threads=args.threads)
        with LLMEngine(config) as engine:
            tokens, logprobs = generate(engine, args.prompt_ids, params)
    except RuntimeInputError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"token_ids": tokens, "logprobs": logprobs}))
    else:
        for i, toks in enumerate(tokens):
            print(f"prompt {i}: {toks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
