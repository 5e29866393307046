"""Pipelines of real stage processes: the CLI with --pp K against transformers, and the engine
API over a pipeline with requests joining mid-decode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.ports import free_port
from gpu_runtime.sampling import SamplingParams
from tests.gpu_runtime.conftest import eos_of, hf_greedy
from tests.gpu_runtime.test_parity import NEW_TOKENS, PROMPTS, assert_parity

REPO = Path(__file__).resolve().parents[2]


def run_cli(model_dir: Path, prompts: list[list[int]], pp: int, max_new: int = NEW_TOKENS,
            dtype: str = "float32") -> dict:
    cmd = [sys.executable, "-m", "gpu_runtime.generate", "--model", str(model_dir),
           "--max-new-tokens", str(max_new), "--pp", str(pp), "--dtype", dtype, "--json",
           "--threads", "1"]
    for p in prompts:
        cmd += ["--prompt-ids", ",".join(map(str, p))]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"CLI failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant,pp", [("llama-gqa", 1), ("llama-gqa", 2), ("llama-gqa", 3),
                                        ("llama-gqa", 4), ("opt", 3), ("llama-tied", 2),
                                        ("opt-proj", 2)])
def test_cli_pipeline_matches_transformers(variant, pp, model_dirs, hf_models):
    model_dir = model_dirs[variant]
    result = run_cli(model_dir, PROMPTS, pp)
    assert set(result) == {"token_ids", "logprobs"}, result.keys()
    assert len(result["token_ids"]) == len(PROMPTS)
    hf = hf_models(model_dir)
    for i, prompt in enumerate(PROMPTS):
        ref = hf_greedy(hf, prompt, NEW_TOKENS, eos_of(model_dir))
        assert_parity((result["token_ids"][i], result["logprobs"][i]), ref)


def test_cli_rejects_token_outside_vocab(model_dirs):
    cmd = [sys.executable, "-m", "gpu_runtime.generate", "--model", str(model_dirs["opt"]),
           "--prompt-ids", "1,99999", "--max-new-tokens", "2", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "99999" in proc.stderr and "0..511" in proc.stderr, proc.stderr


def test_pipeline_engine_with_joining_requests(model_dirs, hf_models):
    """pp = 4 through the engine API: a request joins while another decodes; the pipeline's
    per-stage stats account for every step."""
    model_dir = model_dirs["llama-sharded"]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    got: dict[str, list] = {"a": [[], []], "b": [[], []]}
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", pp=4,
                          num_threads=1)
    with LLMEngine(config) as engine:
        engine.add_request("a", PROMPTS[0], params)
        num_steps = 0
        while engine.has_unfinished():
            if num_steps == 3:
                engine.add_request("b", PROMPTS[2], params)
            for out in engine.step():
                got[out.request_id][0] += out.new_token_ids
                got[out.request_id][1] += out.new_logprobs
            num_steps += 1
        stats = engine.runner.stats()
    assert [s["stage"] for s in stats] == [1, 2, 3], stats
    assert all(s["steps"] == num_steps for s in stats), (num_steps, stats)
    hf = hf_models(model_dir)
    for rid, prompt in (("a", PROMPTS[0]), ("b", PROMPTS[2])):
        assert_parity(tuple(got[rid]), hf_greedy(hf, prompt, NEW_TOKENS))




def test_stages_started_by_hand_over_tcp(model_dirs, hf_models):
    """The multi-host path: stage 1 started on its own (as on another host) on a TCP address,
    stage 0 pointed at it with ``stage_addresses``."""
    model_dir = model_dirs["opt"]
    addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    worker = subprocess.Popen(
        [sys.executable, "-m", "gpu_runtime.pipeline", "--model", str(model_dir), "--pp", "2",
         "--stage", "1", "--addresses", ",".join(addresses), "--dtype", "float32",
         "--threads", "1"], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", pp=2,
                              stage_addresses=tuple(addresses))
        with LLMEngine(config) as engine:
            assert engine.runner.procs == []  # nothing spawned: the stage runs "elsewhere"
            engine.add_request("t", PROMPTS[1], SamplingParams(max_tokens=8))
            tokens, logprobs = [], []
            while engine.has_unfinished():
                for out in engine.step():
                    tokens += out.new_token_ids
                    logprobs += out.new_logprobs
        assert worker.wait(timeout=30) == 0  # the stop message ends the remote stage cleanly
    finally:
        if worker.poll() is None:
            worker.kill()
    ref = hf_greedy(hf_models(model_dir), PROMPTS[1], 8, eos_of(model_dir))
    assert_parity((tokens, logprobs), ref)


def test_stage_exits_when_stage_0_dies(model_dirs, tmp_path):
    """A stage started by stage 0 does not outlive it (no orphans after a crash)."""
    script = tmp_path / "stage0.py"
    script.write_text(
        "import os, sys\n"
        "from gpu_runtime.engine import EngineConfig, LLMEngine\n"
        f"e = LLMEngine(EngineConfig(model={str(model_dirs['opt'])!r}, pp=2, device='cpu'))\n"
        "print(e.runner.procs[0].pid, flush=True)\n"
        "os._exit(3)  # crash without closing the pipeline\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 3, proc.stderr[-2000:]
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and is_running(child):
        time.sleep(0.2)
    assert not is_running(child), f"stage process {child} outlived stage 0"


def is_running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
