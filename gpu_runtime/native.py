"""Builds and loads the decode-path CPU kernels (``csrc/*.c``).

The library is compiled by the system C compiler, once per machine, into a cache directory
(``$HYDRA_NATIVE_CACHE``, default ``~/.cache/hydraserve/native``) under a name keyed by the
source, the flags and the CPU's feature flags: ``-march=native`` code may not run on another
CPU, so a cache shared across machines holds one build per kind of CPU. A build is written to a
temporary file and renamed into place, so processes starting together never load half a file.
``python -m gpu_runtime.native`` builds ahead of time (the Makefile's ``venv`` target and the
Dockerfile do), so no cold start waits for a compiler.

OpenMP, but torch's: the library asks for ``libgomp.so.1``, and loaded after torch (``load``
imports it first) that name is torch's own copy, so a parallel region of a kernel runs on the
threads torch's matrix products use, already awake, not on a second set fighting them for the
cores. Only decode attention of a large batch uses it (two halves); the other kernels are
single-threaded (``gpu_runtime.backends.cpu`` says where they pay).

Without a compiler, on a failed build, or with ``HYDRA_NATIVE=0``, ``load()`` returns None
(logged once, with the reason) and the CPU gets the torch backend (``gpu_runtime.backends``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("kernels.h", "attention.c", "layer_ops.c")  # the header first: it goes in the hash
# -ffp-contract=off: a * b + c * d stays two roundings, as in torch's eager kernels (the
# kernels write fmaf where they want a fused multiply-add). $HYDRA_NATIVE_MARCH overrides
# -march=native, e.g. x86-64-v3 for one build that runs on a fleet of AVX2 machines.
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-std=gnu11")


def flags() -> tuple[str, ...]:
    return (f"-march={os.environ.get('HYDRA_NATIVE_MARCH', 'native')}", *BASE_FLAGS)
ABI_VERSION = 3  # hydra_abi_version() of the source this module's signatures describe

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_I64P = ctypes.POINTER(ctypes.c_int64)
SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    # name: (restype, argtypes), as declared in csrc/*.c
    "hydra_abi_version": (_I32, []),
    "hydra_decode_attention": (_I32, [_P, _I64, _P, _I64, _P, _I64, _P, _I64, _I32, _P, _P, _I64,
                                      _P, _I64, _I32, _I32, _I32, _I32, _F32, _P, _I32, _I64P]),
    "hydra_rms_norm": (_I32, [_P, _P, _P, _P, _P, _I64, _I64, _F32, _I32]),
    "hydra_silu_mul": (None, [_P, _P, _P, _I64, _I32]),
    "hydra_rope_qk": (_I32, [_P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _I32, _I32]),
    "hydra_logits_stats": (None, [_P, _I64, _I64, _P, _P]),
}


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled; the message names the compiler and its output."""


def cache_dir() -> Path:
    env = os.environ.get("HYDRA_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hydraserve" / "native"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _cpu_features() -> str:
    """What ``-march=native`` depends on: the architecture and the CPU's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def library_path(cc: str) -> Path:
    digest = hashlib.sha256()
    parts = [(CSRC / name).read_bytes() for name in SOURCES]
    for part in (*parts, " ".join(flags()).encode(), cc.encode(), _cpu_features().encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / f"cpu_kernels-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """The library's path, compiled first unless the cache already holds it."""
    cc = compiler()
    if cc is None:
        raise NativeBuildError(f"no C compiler ({os.environ.get('CC', 'cc')!r} is not on PATH)")
    target = library_path(cc)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        sources = [str(CSRC / name) for name in SOURCES if name.endswith(".c")]
        done = subprocess.run([cc, *flags(), "-o", tmp, *sources, "-lm"], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise NativeBuildError(f"{cc} failed ({done.returncode}): {done.stderr.strip()}")
        os.replace(tmp, target)  # atomic: a concurrent loader sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# what loading can raise: no compiler or a failed build, a library the loader refuses, a
# compiler run that hung, a symbol missing from the library
LOAD_ERRORS = (NativeBuildError, OSError, subprocess.SubprocessError, AttributeError)


def _open(path: Path) -> ctypes.CDLL:
    """The library at ``path``, its functions declared and its ABI checked."""
    import torch  # noqa: F401  (first: its libgomp.so.1 is the one the library binds to)

    lib = ctypes.CDLL(str(path))  # CDLL calls release the GIL
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    version = lib.hydra_abi_version()
    if version != ABI_VERSION:
        raise NativeBuildError(f"library ABI {version}, this module expects {ABI_VERSION}")
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernels, or None (logged once, with why) when they are off or cannot be built."""
    if os.environ.get("HYDRA_NATIVE", "1") == "0":
        log.info("native CPU kernels off (HYDRA_NATIVE=0): using the torch path")
        return None
    try:
        return _open(build())
    except LOAD_ERRORS as e:
        log.warning("native CPU kernels unavailable, using the torch path: %s", e)
        return None


def main() -> int:
    """``python -m gpu_runtime.native``: build now (image build, ``make venv``) and check that
    the library loads."""
    try:
        path = build()
        _open(path)
    except LOAD_ERRORS as e:
        print(f"native kernels not built: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
