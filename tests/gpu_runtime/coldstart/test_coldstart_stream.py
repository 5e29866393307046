"""The streaming loader: bit-for-bit equal to a plain load, zero-copy on CPU, progressive as
the bytes arrive, and loud when the fetch or the plan is wrong; on CUDA it reports the
host-to-device path it took (and, where a GPU is present, loads the same bits by both)."""

from __future__ import annotations

import time

import pytest
import torch

import gpu_runtime.coldstart.stream as stream_module
from gpu_runtime.coldstart import (
    CopyConfig,
    StageLoadError,
    StreamConfig,
    plan_group,
    stream_into,
    stream_stage,
)
from gpu_runtime.coldstart.cuda_copy import span_of
from gpu_runtime.config import parse_config
from gpu_runtime.loader import load_checkpoint, load_stage, plan_stages
from gpu_runtime.prefetch import FetchFailedError, open_buffer
from gpu_runtime.prefetch.header import DATA_OFFSET
from gpu_runtime.stage import Stage, build_stage
from gpu_runtime.store import FetchConfig, LinkConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


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
    assert_same_bits(loaded.stage, load_checkpoint(cs_root / model, device="cpu"))
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
    assert loaded.stats.h2d is None  # no host-to-device path on CPU
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
    assert_same_bits(loaded.stage, load_checkpoint(cs_root / "opt", dtype="float32",
                                                   device="cpu"))
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



class FakeCudaStage:
    """What ``stream_into`` uses of a stage on a CUDA device; keeps what it is given."""

    def __init__(self, spec, dtype: torch.dtype) -> None:
        self.spec, self.dtype, self.device = spec, dtype, torch.device("cuda", 0)
        self.loaded: dict[str, torch.Tensor] = {}
        self.fused = False

    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.loaded[name] = tensor

    def missing(self) -> list[str]:
        return [n for n in self.spec.tensor_names if n not in self.loaded]

    def fuse_projections(self) -> int:
        self.fused = True
        return 0


class FakeCopier:
    """A copier that hands tensors back unchanged and records its calls; ``fail_at``: the
    ``to_device`` call that raises."""

    def __init__(self, path: str, fail_at: int | None = None) -> None:
        self.path, self.fail_at, self.calls = path, fail_at, []

    def to_device(self, src: torch.Tensor, wait: bool = False) -> torch.Tensor:
        self.calls.append(("to_device", wait))
        if len(self.calls) == self.fail_at:
            raise RuntimeError("copy failed")
        return src

    def finish(self) -> None:
        self.calls.append(("finish",))

    def close(self) -> None:
        self.calls.append(("close",))


def cuda_load_with(monkeypatch, copier: FakeCopier, *streamed_args):
    _, job, plan, buffer, _, dtype = streamed(*streamed_args)
    opened: list[tuple] = []

    def fake_open(device, config, span, driver):
        opened.append((device, span))
        return copier

    monkeypatch.setattr(stream_module, "open_copier", fake_open)
    return FakeCudaStage(plan.spec, dtype), buffer, job, opened


def test_a_cuda_load_reports_its_copy_path(monkeypatch, make_prefetcher, cs_server, cs_index):
    copier = FakeCopier("staged: cudaHostRegister(flags=9) failed: fake")
    stage, buffer, job, opened = cuda_load_with(monkeypatch, copier, make_prefetcher, cs_server,
                                                cs_index, "llama", 1)
    stats = stream_into(stage, buffer, job.layout)
    assert stats.h2d == stats.to_dict()["h2d"] == copier.path
    assert stats.h2d_setup_s >= 0 and stats.to_dict()["h2d_setup_s"] == stats.h2d_setup_s
    assert stage.fused  # once every tensor is on the device: q/k/v and gate/up fused
    # the copier was opened on the whole buffer's pages, every tensor went through it, and
    # it was closed after the last copy was waited for
    (device, span), = opened
    assert device == torch.device("cuda", 0)
    assert span == span_of(buffer.address, job.handle.size), (span, buffer.address)
    assert span.ptr <= buffer.address < buffer.address + job.handle.size <= span.ptr + span.nbytes
    n = len(stage.spec.tensor_names)
    assert copier.calls == [("to_device", False)] * n + [("finish",), ("close",)]
    assert stats.copied_bytes == stats.num_bytes > 0 and stats.aliased_bytes == 0


def test_a_failed_cuda_load_still_closes_its_copier(monkeypatch, make_prefetcher, cs_server,
                                                    cs_index):
    copier = FakeCopier("registered", fail_at=3)
    stage, buffer, job, _ = cuda_load_with(monkeypatch, copier, make_prefetcher, cs_server,
                                           cs_index, "llama", 1)
    with pytest.raises(RuntimeError, match="copy failed"):
        stream_into(stage, buffer, job.layout)
    assert copier.calls == [("to_device", False)] * 3 + [("close",)]  # unregistered, no finish


@needs_cuda
@pytest.mark.parametrize("model,dtype,h2d,path", [
    ("llama", torch.bfloat16, "auto", "registered"),
    ("llama", torch.bfloat16, "staged", "staged: asked for by CopyConfig.h2d=staged"),
    ("opt", torch.float32, "auto", "registered")])  # bf16 -> float32 after the copy
def test_cuda_load_equals_load_checkpoint_bit_for_bit(model, dtype, h2d, path, make_prefetcher,
                                                      cs_server, cs_index, cs_root):
    _, job, plan, buffer, config, _ = streamed(make_prefetcher, cs_server, cs_index, model, 1)
    loaded = stream_stage(config, plan.spec, buffer, job.layout, dtype, "cuda",
                          StreamConfig(copy=CopyConfig(h2d=h2d)))
    assert loaded.stats.h2d == path, loaded.stats.h2d
    want = params(load_checkpoint(cs_root / model, dtype=str(dtype)[6:], device="cpu"))
    got = params(loaded.stage)
    assert got.keys() == want.keys()
    for name, p in got.items():
        assert p.device.type == "cuda" and p.dtype == dtype, (name, p.device, p.dtype)
        assert torch.equal(p.cpu().reshape(-1).view(torch.uint8),
                           want[name].reshape(-1).view(torch.uint8)), name
