"""Engine behaviour: preemption under a tiny KV budget, typed input errors, stop conditions,
abort, and KV export / import."""

from __future__ import annotations

import pytest
import torch

from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.errors import (
    DuplicateRequestError,
    PromptTooLongError,
    RuntimeInputError,
    TokenIdError,
)
from gpu_runtime.generate import generate
from gpu_runtime.sampling import SamplingParams
from gpu_runtime.scheduler import SchedulerConfig
from tests.gpu_runtime.conftest import PROMPTS


def engine_for(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", **kw))


def run_all(engine: LLMEngine, prompts, params) -> dict[str, list[int]]:
    tokens, _ = generate(engine, prompts, params)
    return {str(i): t for i, t in enumerate(tokens)}


def test_preemption_under_tiny_kv_budget_gives_the_same_tokens(model_dirs):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    with engine_for(model_dirs["llama-gqa"]) as roomy:
        expected = run_all(roomy, PROMPTS, params)
    # 8 blocks of 4 tokens = 32 slots; the three sequences grow to 31, 22 and 27 tokens
    with engine_for(model_dirs["llama-gqa"], block_size=4, num_kv_blocks=8) as tight:
        got = run_all(tight, PROMPTS, params)
        assert tight.scheduler.num_preemptions > 0, "budget too large to force preemption"
        assert tight.blocks.num_free_blocks == 8, "blocks leaked"
    assert got == expected


def test_requests_wait_when_blocks_run_out(model_dirs):
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    with engine_for(model_dirs["llama-gqa"], block_size=4, num_kv_blocks=4) as engine:
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), p, params)
        outs = engine.step()  # prefill: the 11-token prompt takes 3 of 4 blocks
        assert [o.request_id for o in outs] == ["0", "1"]
        assert [s.request_id for s in engine.scheduler.waiting] == ["2"]
        while engine.has_unfinished():
            engine.step()


def test_typed_errors_name_the_value_and_range(model_dirs):
    with engine_for(model_dirs["opt"]) as engine:  # vocab 512, context 512
        with pytest.raises(TokenIdError, match=r"600.*0\.\.511"):
            engine.add_request("a", [1, 600])
        with pytest.raises(TokenIdError, match=r"-1.*0\.\.511"):
            engine.add_request("a", [-1])
        with pytest.raises(PromptTooLongError, match=r"512 tokens.*at most 511"):
            engine.add_request("a", [5] * 512)
        engine.add_request("a", [5] * 511, SamplingParams(max_tokens=10))
        with pytest.raises(DuplicateRequestError, match="'a'"):
            engine.add_request("a", [5])
        outs = engine.step()
        assert outs[0].finished and outs[0].finish_reason == "length"  # context is full
        assert outs[0].num_output_tokens == 1
    with pytest.raises(RuntimeInputError, match="pp=5"):
        engine_for(model_dirs["opt"], pp=5)


def test_eos_stops_unless_ignored(model_dirs):
    model_dir = model_dirs["llama-gqa"]
    with engine_for(model_dir) as engine:
        first = run_all(engine, [PROMPTS[0]], SamplingParams(max_tokens=6))["0"]
        # pretend the third generated token is EOS
        object.__setattr__(engine.model_config, "eos_token_ids", (first[2],))
        engine.add_request("x", PROMPTS[0], SamplingParams(max_tokens=6))
        engine.add_request("y", PROMPTS[0], SamplingParams(max_tokens=6, ignore_eos=True))
        finals = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
    assert finals["x"].finish_reason == "stop" and finals["x"].num_output_tokens == 3
    assert finals["y"].finish_reason == "length" and finals["y"].num_output_tokens == 6


def test_stop_string_ends_the_request_and_cuts_the_text(model_dirs):
    with engine_for(model_dirs["llama-gqa"]) as engine:
        full = run_all(engine, [PROMPTS[0]], SamplingParams(max_tokens=8, ignore_eos=True))["0"]
        text = engine.tokenizer.decode(full)
        prefix_len = next(i for i in range(1, 9) if engine.tokenizer.decode(full[:i]).strip())
        stop = engine.tokenizer.decode(full[:prefix_len]).strip()[-1:]
        assert stop, text
        engine.add_request("s", PROMPTS[0], SamplingParams(max_tokens=8, stop=(stop,),
                                                          ignore_eos=True))
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
    last = outs[-1]
    assert last.finished and last.finish_reason == "stop", last
    assert stop not in last.text and last.num_output_tokens <= prefix_len, (last, stop)


def test_abort_frees_blocks(model_dirs):
    with engine_for(model_dirs["llama-gqa"], block_size=4, num_kv_blocks=16) as engine:
        engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=50))
        engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=50))
        engine.step()
        assert engine.blocks.num_free_blocks == 16 - 3 - 1
        assert engine.abort("a") and not engine.abort("a") and not engine.abort("zzz")
        assert engine.blocks.num_free_blocks == 16 - 1
        outs = engine.step()
        assert [o.request_id for o in outs] == ["b"]


def test_scheduler_respects_max_num_seqs(model_dirs):
    sched = SchedulerConfig(max_num_seqs=2)
    with engine_for(model_dirs["llama-gqa"], scheduler=sched) as engine:
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), p, SamplingParams(max_tokens=3, ignore_eos=True))
        sizes = []
        while engine.has_unfinished():
            sizes.append(len(engine.step()))
    assert max(sizes) == 2 and sum(sizes) == 9, sizes


def test_kv_export_import_round_trip(model_dirs):
    """Export a running sequence's KV, wipe the cache, import it back: decoding continues as if
    nothing happened (the contract KV migration relies on)."""
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    with engine_for(model_dirs["llama-gqa"]) as ref:
        expected = run_all(ref, [PROMPTS[0]], params)["0"]
    with engine_for(model_dirs["llama-gqa"], block_size=4) as engine:
        engine.add_request("m", PROMPTS[0], params)
        got = []
        for _ in range(4):
            got += engine.step()[0].new_token_ids
        kv = engine.export_kv("m")
        c = engine.model_config
        assert kv.shape == (c.num_layers, 2, len(PROMPTS[0]) + 3, c.num_kv_heads, c.head_dim)
        half = engine.export_kv("m", range(1, 3))
        assert torch.equal(half, kv[1:3])
        engine.kv.data.zero_()
        engine.import_kv("m", kv)
        while engine.has_unfinished():
            got += engine.step()[0].new_token_ids
    assert got == expected


def test_kv_import_into_other_blocks(model_dirs):
    from gpu_runtime.kv_cache import KVCache, KVCacheSpec

    spec = KVCacheSpec(layer_start=4, num_layers=2, num_blocks=6, block_size=4, num_kv_heads=2,
                       head_dim=8, dtype=torch.bfloat16)
    src, dst = KVCache(spec), KVCache(spec)
    src.data.normal_()
    kv = src.export_kv([5, 0, 3], 10, range(4, 6))
    dst.import_kv([1, 2, 4], kv, range(4, 6))
    assert torch.equal(dst.export_kv([1, 2, 4], 10, range(4, 6)), kv)
    assert torch.equal(dst.data[:, :, 3], torch.zeros_like(dst.data[:, :, 3]))  # untouched block
    assert kv.dtype == torch.bfloat16 and kv.shape == (2, 2, 10, 2, 8)
    with pytest.raises(AssertionError, match="outside this stage"):
        src.export_kv([5], 2, range(0, 2))


def resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_large_cpu_kv_cache_is_zero_and_takes_memory_only_where_written():
    """A cold start allocates the KV cache of its whole memory share; on CPU that must not
    write gigabytes of zeros up front."""
    from gpu_runtime.kv_cache import KVCache, KVCacheSpec

    spec = KVCacheSpec(layer_start=0, num_layers=8, num_blocks=4096, block_size=16,
                       num_kv_heads=4, head_dim=64, dtype=torch.float32)  # 1 GiB
    before = resident_bytes()
    cache = KVCache(spec)
    assert cache.data.numel() * 4 == 1 << 30
    assert resident_bytes() - before < 64 << 20
    k, v = cache.layer(7)
    assert torch.count_nonzero(k[4095]) == 0 and torch.count_nonzero(v[0]) == 0
    k[4095].fill_(2.0)
    assert cache.data[7, 0, 4095].sum() == 2.0 * 16 * 4 * 64
    assert resident_bytes() - before < 64 << 20  # a few pages touched, not the whole GiB
