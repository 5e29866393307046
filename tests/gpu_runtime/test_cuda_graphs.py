"""Decode graphs (gpu_runtime/cuda_graphs.py) without a GPU: the capture is replaced by a
recorder whose replay runs the recorded step again on the static buffers, so everything but
the CUDA capture itself is checked here: the static inputs, the metadata that stands for any
step of a batch size, when steps are eager, captured and replayed, and the fallback when a
capture fails. The tokens must be the eager engine's, bit for bit."""

from __future__ import annotations

import pytest
import torch

from gpu_runtime import cuda_graphs, native
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model
from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.model_runner import decode_graphs
from gpu_runtime.sampling import SamplingParams

# the recorded step reads the context lengths from a tensor: the native CPU decode kernel
# does, the torch fallback (which takes the longest context from the Python list) does not
needs_native = pytest.mark.skipif(native.load() is None, reason="native kernels not built")
PROMPTS = [[1, 5, 9, 13], [2, 4, 8], [7, 7, 7, 7, 7, 7, 3]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    return make_demo_model(root / "llama", DemoModelSpec(arch="llama", size="tiny", seed=5))


def generate(engine: LLMEngine, max_tokens: int = 12) -> dict[str, list]:
    """Each request's (token, logprob) pairs: the logprobs tell a step computed from other
    inputs even where the greedy token happens to be the same."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens,
                                                           ignore_eos=True))
    out: dict[str, list] = {f"r{i}": [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += zip(o.new_token_ids, o.new_logprobs, strict=True)
    return out


def rerun(run):
    """A capture that runs the step once to record it (as a CUDA capture runs the Python once)
    and whose replay runs it again on the same static buffers."""
    run()
    return run


def eager_and_graphed(model_dir, capture):
    """(what an eager engine generates, an engine whose runner has graphs over ``capture``)."""
    config = EngineConfig(model=str(model_dir), kv_cache_bytes=4 << 20)
    with LLMEngine(config) as eager:
        expected = generate(eager)
    engine = LLMEngine(config)
    runner = engine.runner
    runner.graphs = cuda_graphs.DecodeGraphs(runner.stage, runner.kv, capture=capture)
    return expected, engine


@needs_native
def test_graph_replays_give_the_eager_tokens(model_dir):
    expected, engine = eager_and_graphed(model_dir, rerun)
    with engine:
        runner = engine.runner
        assert generate(engine) == expected
        # 11 decode steps of batch 3: one eager, one eager on the static buffers and captured,
        # nine replays
        assert runner.graphs.counts == {"eager": 1, "captured": 1, "replayed": 9}
        again = generate(engine)  # new sequences, other blocks: the same graph serves them
        assert runner.graphs.counts["replayed"] == 9 + 11
    with LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=4 << 20)) as eager:
        generate(eager)
        assert again == generate(eager)


@needs_native
def test_a_failed_capture_turns_graphs_off_and_the_step_runs_eagerly(model_dir):
    def broken(run):
        raise RuntimeError("operation not permitted when stream is capturing")

    expected, engine = eager_and_graphed(model_dir, broken)
    with engine:
        runner = engine.runner
        assert generate(engine) == expected
        assert "capture of batch 3 failed: RuntimeError" in runner.graphs.disabled
        assert runner.graphs.counts["replayed"] == 0


def test_graphs_only_where_they_can_hold_the_step(model_dir, monkeypatch):
    with LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=4 << 20)) as engine:
        runner = engine.runner
        assert runner.graphs is None  # a CPU device: every step eager
        assert decode_graphs(runner.stage, runner.kv) is None
        graphs = cuda_graphs.DecodeGraphs(runner.stage, runner.kv, capture=rerun, sizes=(2,))

        class Step:  # what ``applies`` reads of a step
            def __init__(self, query_lens, num_samples=None, block_copies=()):
                self.query_lens, self.num_samples = query_lens, num_samples
                self.block_copies = list(block_copies)

        assert graphs.applies(Step([1, 1]))
        assert not graphs.applies(Step([1, 1, 1]))  # no graph of that size
        assert not graphs.applies(Step([3, 1]))  # a prefill
        assert not graphs.applies(Step([1, 1], num_samples=[2, 1]))  # n choices forking
        assert not graphs.applies(Step([1, 1], block_copies=[(0, 1)]))
    monkeypatch.setenv("HYDRA_CUDA_GRAPHS", "0")
    assert not cuda_graphs.enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_captured_graphs_give_the_eager_tokens(model_dir):
    """The real thing (bench/gpu_check.sh runs it on the device): CUDA graphs captured and
    replayed by the engine's own runner against the same engine with graphs off."""
    config = EngineConfig(model=str(model_dir), kv_cache_bytes=4 << 20, device="cuda")
    with LLMEngine(config) as eager:
        eager.runner.graphs = None
        expected = generate(eager)
    with LLMEngine(config) as engine:
        assert engine.runner.graphs is not None, "no graphs on CUDA (is triton installed?)"
        got = generate(engine)
        assert engine.runner.graphs.disabled is None, engine.runner.graphs.disabled
        assert engine.runner.graphs.counts["replayed"] == 9
    for rid, pairs in expected.items():
        assert [t for t, _ in got[rid]] == [t for t, _ in pairs], rid
        torch.testing.assert_close([p for _, p in got[rid]], [p for _, p in pairs],
                                   rtol=1e-4, atol=1e-4)
