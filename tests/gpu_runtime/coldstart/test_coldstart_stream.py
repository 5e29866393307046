"""The streaming loader: bit-for-bit equal to a plain load, zero-copy on CPU, progressive as
the bytes arrive, and loud when the fetch or the plan is wrong."""

from __future__ import annotations

import time

import pytest
import torch

from gpu_runtime.coldstart import StageLoadError, plan_group, stream_into, stream_stage
from gpu_runtime.config import parse_config
from gpu_runtime.loader import load_checkpoint, load_stage, plan_stages
from gpu_runtime.prefetch import FetchFailedError, open_buffer
from gpu_runtime.prefetch.header import DATA_OFFSET
from gpu_runtime.stage import Stage, build_stage
from gpu_runtime.store import FetchConfig, LinkConfig


def params(stage: Stage) -> dict[str, torch.Tensor]:
    return dict(stage.model.named_parameters(remove_duplicate=False))


def assert_same_bits(got: Stage, want: Stage) -> None:
    """Same parameter names, and every parameter the stage holds has the same bits; parameters
    outside the stage (e.g. the head on stage 0 of 2) stay on meta in both."""
    assert got.missing() == [] and want.missing() == []
    a, b = params(got), params(want)
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    held = 0
    for name in a:
        x, y = a[name], b[name]
        assert (x.dtype, x.shape, x.is_meta) == (y.dtype, y.shape, y.is_meta), name
        if y.is_meta:
            continue
        held += 1
        assert x.device == y.device, name
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), name
    assert held >= 3, f"only {held} parameters compared"


def streamed(make_prefetcher, cs_server, cs_index, model: str, pp: int, index: int = 0,
             dtype: torch.dtype | None = None, **pf_kwargs):
    plan = plan_group(model, cs_index[model], pp, kv_cache_bytes=1 << 20)[index]
    pf = make_prefetcher(**pf_kwargs)
    job = pf.prefetch(model, plan.cache_stage, f"{cs_server.url}/{model}", plan.entries)
    buffer = open_buffer(job.handle)
    config = parse_config(cs_index[model].config)
    return pf, job, plan, buffer, config, dtype or torch.bfloat16


@pytest.mark.parametrize("model", ["llama", "opt"])
def test_whole_model_equals_load_checkpoint_bit_for_bit(model, make_prefetcher, cs_server,
                                                        cs_index, cs_root):
    _, job, plan, buffer, config, dtype = streamed(make_prefetcher, cs_server, cs_index, model, 1)
    loaded = stream_stage(config, plan.spec, buffer, job.layout, dtype)
    assert_same_bits(loaded.stage, load_checkpoint(cs_root / model))
    assert loaded.stats.num_tensors == len(plan.entries)
    assert loaded.stats.num_bytes == plan.fetch_bytes == cs_index[model].total_bytes


@pytest.mark.parametrize("model", ["llama", "opt"])
def test_pp2_stages_equal_load_stage_bit_for_bit(model, make_prefetcher, cs_server, cs_index,
                                                 cs_root):
    config_f, specs_f, files = plan_stages(cs_root / model, 2)
    for i in range(2):
        _, job, plan, buffer, config, dtype = streamed(make_prefetcher, cs_server, cs_index,
                                                       model, 2, i)
        assert plan.spec == specs_f[i]
        loaded = stream_stage(config, plan.spec, buffer, job.layout, dtype)
        assert_same_bits(loaded.stage, load_stage(cs_root / model, specs_f[i], config_f, files,
                                                  dtype, "cpu"))
        assert loaded.stats.num_bytes == plan.fetch_bytes < cs_index[model].total_bytes


def test_cpu_parameters_alias_the_shared_buffer(make_prefetcher, cs_server, cs_index):
    pf, job, plan, buffer, config, dtype = streamed(make_prefetcher, cs_server, cs_index,
                                                    "llama", 1)
    loaded = stream_stage(config, plan.spec, buffer, job.layout, dtype)
    lo, hi = buffer.address, buffer.address + job.handle.size
    ps = params(loaded.stage)
    for name, p in ps.items():
        assert lo <= p.data_ptr() and p.data_ptr() + p.nbytes <= hi, (name, p.data_ptr(), lo, hi)
    assert loaded.stats.aliased_bytes == loaded.stats.num_bytes and loaded.stats.copied_bytes == 0
    # a write through the prefetcher's own mapping shows up in the parameter: same memory
    placement = next(p for p in job.layout.placements if p.name == "model.norm.weight")
    at = job.handle.extent_offset + DATA_OFFSET + placement.buffer_offset
    norm = next(p for p in ps.values() if p.data_ptr() == buffer.address + placement.buffer_offset)
    assert norm.shape == (config.hidden_size,) and norm[0].item() != 1.0
    before = bytes(pf.pool.mm[at:at + 2])
    pf.pool.mm[at:at + 2] = b"\x80\x3f"  # bf16 1.0
    try:
        assert norm[0].item() == 1.0
    finally:
        pf.pool.mm[at:at + 2] = before


def test_parameters_materialise_while_the_fetch_runs(make_prefetcher, cs_server, cs_index):
    # 7.9 MB at 3 MB/s: about 2.6 s of fetch, in 256 KiB chunks
    _, job, plan, buffer, config, dtype = streamed(
        make_prefetcher, cs_server, cs_index, "llama", 1, link=LinkConfig(bandwidth_mb_s=3),
        fetch=FetchConfig(num_connections=2, chunk_bytes=256 * 1024))
    seen: list[tuple[float, int, bool, int]] = []

    def on_tensor(name: str, tensor: torch.Tensor, elapsed: float) -> None:
        seen.append((elapsed, buffer.progress().mark, job.done, len(stage_ref[0].missing())))

    stage_ref = [build_stage(config, plan.spec, dtype)]
    started = time.monotonic()
    stream_into(stage_ref[0], buffer, job.layout, on_tensor=on_tensor)
    total = time.monotonic() - started
    first = seen[0]
    assert total > 1.5, f"the capped fetch took only {total:.2f} s"
    assert first[1] < job.layout.size and not first[2], f"first tensor only after the fetch: {first}"
    assert first[0] < total / 4, f"first tensor at {first[0]:.2f} s of {total:.2f} s"
    missing = [m for *_, m in seen]
    assert missing == sorted(missing, reverse=True) and missing[-1] == 0 < missing[0]
    # loading advanced across the fetch, not in one burst at its end
    assert sum(1 for t, *_ in seen if t < total / 2) >= len(seen) // 4, seen


def test_dtype_conversion_copies_once_and_matches_a_plain_load(make_prefetcher, cs_server,
                                                               cs_index, cs_root):
    _, job, plan, buffer, config, _ = streamed(make_prefetcher, cs_server, cs_index, "opt", 1)
    loaded = stream_stage(config, plan.spec, buffer, job.layout, torch.float32)
    assert_same_bits(loaded.stage, load_checkpoint(cs_root / "opt", dtype="float32"))
    assert loaded.stats.copied_bytes == loaded.stats.num_bytes and loaded.stats.aliased_bytes == 0


def test_a_parameter_missing_from_the_buffer_is_a_stage_load_error(make_prefetcher, cs_server,
                                                                   cs_index):
    plan = plan_group("llama", cs_index["llama"], 1)[0]
    entries = [e for e in plan.entries if e.name != "model.norm.weight"]
    pf = make_prefetcher()
    job = pf.prefetch("llama", "short", f"{cs_server.url}/llama", entries)
    config = parse_config(cs_index["llama"].config)
    with pytest.raises(StageLoadError, match=r"'norm\.weight'"):
        stream_stage(config, plan.spec, open_buffer(job.handle), job.layout, torch.bfloat16)


def test_a_failed_fetch_raises_its_typed_error(make_prefetcher, cs_server, cs_index):
    plan = plan_group("llama", cs_index["llama"], 1)[0]
    pf = make_prefetcher()
    job = pf.prefetch("llama", "wrong", f"{cs_server.url}/no-such-model", plan.entries)
    config = parse_config(cs_index["llama"].config)
    with pytest.raises(FetchFailedError, match="no-such-model"):
        stream_stage(config, plan.spec, open_buffer(job.handle), job.layout, torch.bfloat16)

