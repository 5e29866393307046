"""The host-to-device path: its config, the choice between registering the node cache and the
pinned staging slots (with the CUDA runtime faked: no GPU here), the slots made at boot; and,
where a GPU is present, the copies themselves."""

from __future__ import annotations

import contextlib
import mmap
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_runtime.coldstart import cuda_copy
from gpu_runtime.coldstart.cuda_copy import (
    HOST_REGISTER_PORTABLE,
    HOST_REGISTER_READ_ONLY,
    PROBE_BYTES,
    CopyConfig,
    Driver,
    HostSpan,
    choose_path,
    open_copier,
    prepare_staging,
    span_of,
    staging_slots,
    try_register,
)

PAGE = mmap.PAGESIZE
READ_ONLY = HOST_REGISTER_PORTABLE | HOST_REGISTER_READ_ONLY
NOT_SUPPORTED, INVALID = 801, 1  # cudaErrorNotSupported, cudaErrorInvalidValue
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


class FakeRuntime:
    """Answers cudaHostRegister with the code ``codes`` gives the flags (0 when absent)."""

    def __init__(self, codes: dict[int, int] | None = None, unregister_code: int = 0) -> None:
        self.codes = codes or {}
        self.unregister_code = unregister_code
        self.calls: list[tuple] = []

    def driver(self) -> Driver:
        def register(ptr: int, nbytes: int, flags: int) -> int:
            self.calls.append(("register", ptr, nbytes, flags))
            return self.codes.get(flags, 0)

        def unregister(ptr: int) -> int:
            self.calls.append(("unregister", ptr))
            return self.unregister_code

        return Driver(register, unregister, describe=lambda code: f"fake error {code}",
                      clear=lambda: self.calls.append(("clear",)))

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture(autouse=True)
def no_slots(monkeypatch):
    """Every test starts without staging slots and without HYDRA_H2D."""
    monkeypatch.setattr(cuda_copy, "_SLOTS", {})
    monkeypatch.delenv("HYDRA_H2D", raising=False)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_streams": 0}, "num_streams"), ({"num_streams": 33}, "num_streams"),
    ({"staging_bytes": 1000}, "staging_bytes"), ({"h2d": "dma"}, "h2d='dma'")])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CopyConfig(**kwargs)


def test_mode_comes_from_the_config_then_the_environment(monkeypatch):
    assert CopyConfig().mode() == ("auto", "default")
    monkeypatch.setenv("HYDRA_H2D", "staged")
    assert CopyConfig().mode() == ("staged", "HYDRA_H2D=staged")
    assert CopyConfig(h2d="auto").mode() == ("auto", "CopyConfig.h2d=auto")
    monkeypatch.setenv("HYDRA_H2D", "pinned")
    with pytest.raises(ValueError, match=r"HYDRA_H2D='pinned'; allowed \('auto', 'staged'\)"):
        CopyConfig().mode()


@pytest.mark.parametrize("address,size,span", [
    (PAGE, PAGE, (PAGE, PAGE)),  # already whole pages
    (PAGE + 100, 10, (PAGE, PAGE)),  # inside one page
    (2 * PAGE - 1, 2, (PAGE, 2 * PAGE)),  # across a page boundary
    (3 * PAGE + 7, 3 * PAGE, (3 * PAGE, 4 * PAGE))])
def test_span_is_the_whole_pages_holding_the_bytes(address, size, span):
    got = span_of(address, size)
    assert (got.ptr, got.nbytes) == span
    assert got.ptr <= address and address + size <= got.ptr + got.nbytes


def test_read_only_registration_is_tried_first():
    fake = FakeRuntime()
    assert try_register(HostSpan(PAGE, 4 * PAGE), fake.driver()) == (READ_ONLY, "")
    assert fake.calls == [("register", PAGE, 4 * PAGE, READ_ONLY)]


def test_plain_registration_follows_a_refused_read_only_one():
    fake = FakeRuntime({READ_ONLY: NOT_SUPPORTED})
    assert try_register(HostSpan(PAGE, PAGE), fake.driver()) == (HOST_REGISTER_PORTABLE, "")
    # the refusal's error is taken back before anything else runs on the thread
    assert fake.kinds() == ["register", "clear", "register"]


def test_both_refusals_are_the_reason():
    fake = FakeRuntime({READ_ONLY: NOT_SUPPORTED, HOST_REGISTER_PORTABLE: INVALID})
    flags, why = try_register(HostSpan(PAGE, PAGE), fake.driver())
    assert flags is None
    assert why == ("cudaHostRegister(flags=9) failed: fake error 801 (error 801); "
                   "cudaHostRegister(flags=1) failed: fake error 1 (error 1)")
    assert fake.kinds() == ["register", "clear", "register", "clear"]


def test_path_is_registered_when_the_driver_takes_the_mapping():
    fake = FakeRuntime()
    assert choose_path(CopyConfig(), HostSpan(PAGE, PAGE), fake.driver()) == (READ_ONLY,
                                                                              "registered")


def test_path_falls_back_to_staging_and_says_why():
    fake = FakeRuntime({READ_ONLY: NOT_SUPPORTED, HOST_REGISTER_PORTABLE: INVALID})
    flags, path = choose_path(CopyConfig(), HostSpan(PAGE, PAGE), fake.driver())
    assert flags is None
    assert path.startswith("staged: cudaHostRegister(flags=9) failed: fake error 801"), path


def test_staged_when_asked_never_touches_the_driver(monkeypatch):
    fake = FakeRuntime()
    assert choose_path(CopyConfig(h2d="staged"), HostSpan(PAGE, PAGE), fake.driver()) == (
        None, "staged: asked for by CopyConfig.h2d=staged")
    monkeypatch.setenv("HYDRA_H2D", "staged")
    assert choose_path(CopyConfig(), HostSpan(PAGE, PAGE), fake.driver()) == (
        None, "staged: asked for by HYDRA_H2D=staged")
    assert choose_path(CopyConfig(h2d="auto"), None, fake.driver()) == (
        None, "staged: no host mapping to register")
    assert fake.calls == []


def fake_allocator(made: list[int]):
    def allocate(nbytes: int) -> torch.Tensor:
        made.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)
    return allocate


def test_boot_makes_no_slots_where_registration_works():
    fake, made = FakeRuntime(), []
    device, config = torch.device("cuda", 0), CopyConfig()
    assert prepare_staging(device, config, fake.driver(), fake_allocator(made)) == "registered"
    assert made == [] and staging_slots(device, config) is None
    # the probe registered a read-only shared mapping, and gave it back
    (_, ptr, nbytes, flags), unregister = fake.calls
    assert (nbytes, flags) == (PROBE_BYTES, READ_ONLY) and ptr % PAGE == 0
    assert unregister == ("unregister", ptr)


def test_boot_makes_the_slots_once_where_registration_fails():
    fake = FakeRuntime({READ_ONLY: NOT_SUPPORTED, HOST_REGISTER_PORTABLE: INVALID})
    made: list[int] = []
    device, config = torch.device("cuda", 0), CopyConfig(num_streams=3, staging_bytes=1 << 20)
    path = prepare_staging(device, config, fake.driver(), fake_allocator(made))
    assert path.startswith("staged: cudaHostRegister(flags=9) failed"), path
    assert made == [1 << 20] * 3
    slots = staging_slots(device, config)
    assert slots is not None and [s.numel() for s in slots] == [1 << 20] * 3
    prepare_staging(device, config, fake.driver(), fake_allocator(made))
    assert made == [1 << 20] * 3 and staging_slots(device, config) is slots
    assert staging_slots(device, CopyConfig()) is None  # another shape: not prepared
    assert staging_slots(torch.device("cuda", 1), config) is None


def test_boot_makes_the_slots_when_staging_is_asked_for():
    fake, made = FakeRuntime(), []
    config = CopyConfig(num_streams=2, staging_bytes=1 << 20, h2d="staged")
    assert prepare_staging(torch.device("cuda", 0), config, fake.driver(),
                           fake_allocator(made)) == "staged: asked for by CopyConfig.h2d=staged"
    assert made == [1 << 20] * 2 and fake.calls == []


class FakeStream:
    def __init__(self, device=None) -> None:
        self.waited = 0

    def wait_stream(self, other) -> None:
        self.waited += 1

    def synchronize(self) -> None:
        pass


class FakeEvent:
    def record(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.fixture
def cpu_streams(monkeypatch):
    """torch.cuda's streams and events as no-ops, so the copiers' own logic (pieces, streams,
    slots, unregistering) runs on CPU tensors; the copier's device is set to cpu after it is
    made. What the device does with the copies is left to the GPU tests below."""
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    current = FakeStream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)
    return current


def on_cpu(copier):
    copier.device = torch.device("cpu")
    return copier


def test_registered_copier_reassembles_pieces_and_unregisters_once(cpu_streams):
    src = torch.from_numpy(np.random.default_rng(1).integers(0, 256, 3 * (1 << 20) + 5,
                                                             dtype=np.uint8))
    fake, span = FakeRuntime(), span_of(src.data_ptr(), src.numel())
    config = CopyConfig(num_streams=3, staging_bytes=1 << 20)
    copier = open_copier(torch.device("cuda", 0), config, span, fake.driver())
    assert isinstance(copier, cuda_copy.RegisteredCopier) and copier.path == "registered"
    on_cpu(copier)
    parts = [copier.to_device(src[:1_500_000]), copier.to_device(src[1_500_000:], wait=True)]
    copier.finish()
    copier.close()
    copier.close()
    assert torch.equal(torch.cat(parts), src) and copier.bytes_copied == src.numel()
    # 2 + 2 pieces of at most 1 MiB, round-robin: every stream took one or two
    assert [s.waited for s in copier.streams] == [2, 1, 1]
    assert fake.calls == [("register", span.ptr, span.nbytes, READ_ONLY),
                          ("unregister", span.ptr)]


def test_a_failed_unregister_is_in_the_path(cpu_streams):
    fake = FakeRuntime(unregister_code=INVALID)
    copier = on_cpu(open_copier(torch.device("cuda", 0), CopyConfig(), HostSpan(PAGE, PAGE),
                                fake.driver()))
    copier.close()
    assert copier.path == "registered; cudaHostUnregister failed: fake error 1 (error 1)"


def test_staged_copier_uses_the_boot_slots(cpu_streams):
    src = torch.arange(5 * (1 << 20) // 4, dtype=torch.int32)
    device, config = torch.device("cuda", 0), CopyConfig(num_streams=2, staging_bytes=1 << 20)
    made: list[int] = []
    prepare_staging(device, replace(config, h2d="staged"), FakeRuntime().driver(),
                    fake_allocator(made))
    fake = FakeRuntime({READ_ONLY: NOT_SUPPORTED, HOST_REGISTER_PORTABLE: INVALID})
    copier = on_cpu(open_copier(device, config, span_of(src.data_ptr(), src.nbytes),
                                fake.driver()))
    assert isinstance(copier, cuda_copy.PinnedStreamCopier)
    assert copier.slots is staging_slots(device, config) and made == [1 << 20] * 2
    assert copier.path.startswith("staged: cudaHostRegister(flags=9) failed"), copier.path
    dst = copier.to_device(src)
    copier.finish()
    copier.close()
    assert torch.equal(dst, src) and made == [1 << 20] * 2  # no slot made during the load


def test_staged_copier_without_boot_slots_says_so(cpu_streams, monkeypatch):
    made: list[int] = []
    monkeypatch.setattr(cuda_copy, "_pinned", fake_allocator(made))
    copier = open_copier(torch.device("cuda", 0), CopyConfig(num_streams=2, h2d="staged"),
                         None, FakeRuntime().driver())
    assert copier.path == ("staged: asked for by CopyConfig.h2d=staged; staging slots "
                           "allocated during the load, not at worker boot")
    assert made == [CopyConfig().staging_bytes] * 2


# ---- on a GPU ------------------------------------------------------------------------------

@pytest.fixture
def read_only_mapping():
    """A read-only shared mapping of a 5 MiB + 123 byte file of known bytes in /dev/shm, as a
    worker maps the node cache; yields (uint8 tensor over it, the bytes)."""
    data = np.random.default_rng(0).integers(0, 256, 5 * (1 << 20) + 123, dtype=np.uint8)
    path = Path("/dev/shm") / f"hydraserve-test-h2d-{uuid.uuid4().hex[:8]}"
    path.write_bytes(data.tobytes())
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), data.size, mmap.MAP_SHARED, mmap.PROT_READ)
        tensor = torch.from_numpy(np.frombuffer(mm, dtype=np.uint8))
        yield tensor, data
        del tensor
        mm.close()
    finally:
        path.unlink()


def copy_through(copier, src: torch.Tensor) -> torch.Tensor:
    # pieces of 1 MiB over 3 streams: several pieces per stream, one of them partial
    halves = [copier.to_device(src[:3_000_001]), copier.to_device(src[3_000_001:].view(-1))]
    copier.finish()
    copier.close()
    return torch.cat(halves).cpu()


@needs_cuda
def test_registered_copy_is_bit_exact_and_unregisters(read_only_mapping):
    src, data = read_only_mapping
    device, config = torch.device("cuda", 0), CopyConfig(num_streams=3, staging_bytes=1 << 20)
    span = span_of(src.data_ptr(), src.numel())
    copier = open_copier(device, config, span)
    assert copier.path == "registered", copier.path
    assert np.array_equal(copy_through(copier, src).numpy(), data)
    driver = cuda_copy.cuda_driver(device)
    flags, why = try_register(span, driver)  # unregistered by close: registering again works
    assert flags is not None, why
    assert driver.unregister(span.ptr) == 0


@needs_cuda
def test_staged_copy_is_bit_exact(read_only_mapping):
    src, data = read_only_mapping
    device = torch.device("cuda", 0)
    config = CopyConfig(num_streams=3, staging_bytes=1 << 20, h2d="staged")
    assert prepare_staging(device, config).startswith("staged: asked for")
    copier = open_copier(device, config, span_of(src.data_ptr(), src.numel()))
    assert copier.path == "staged: asked for by CopyConfig.h2d=staged"
    assert np.array_equal(copy_through(copier, src).numpy(), data)


@needs_cuda
def test_a_failed_registration_leaves_cuda_usable():
    """An unaligned, unmapped range cannot be registered; the copier stages and the next
    kernel launch does not inherit the failed call's error."""
    device = torch.device("cuda", 0)
    flags, path = choose_path(CopyConfig(), HostSpan(PAGE, PAGE),  # page 1: never mapped
                              cuda_copy.cuda_driver(device))
    assert flags is None and path.startswith("staged: cudaHostRegister"), path
    assert torch.ones(4, device=device).sum().item() == 4.0
