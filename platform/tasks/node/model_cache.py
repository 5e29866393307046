"""A node-local copy of a checkpoint served over http(s), for workers that load from files.

The prefetcher (gpu_runtime.prefetch) fetches stage byte ranges into shared memory; until the
node agent drives it, a worker of an http(s) model gets whole files downloaded once per node
into ``HYDRA_CACHE_DIR`` (default ``/tmp/hydra-model-cache``), keyed by the model's fingerprint,
so changed bytes at the same URI never mix with an old copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests

SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
               "model.safetensors.index.json")
CHUNK = 8 << 20


def cache_root() -> Path:
    return Path(os.environ.get("HYDRA_CACHE_DIR", "/tmp/hydra-model-cache"))


def local_dir(uri: str, fingerprint: str, weight_files: list[str]) -> str:
    """A directory holding the checkpoint at ``uri``: the path itself for ``file://``, else a
    cached download (made once; concurrent callers on one node race safely by rename)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return str(Path(unquote(parsed.path)))
    target = cache_root() / fingerprint
    if (target / ".complete").exists():
        return str(target)
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{fingerprint[:12]}-", dir=cache_root()))
    try:
        with requests.Session() as http:
            for name in (*SMALL_FILES, *weight_files):
                _download(http, f"{uri.rstrip('/')}/{name}", tmp / name,
                          required=name in weight_files or name == "config.json")
        (tmp / ".complete").touch()
        try:
            tmp.rename(target)
        except OSError:  # another worker finished first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def fresh_copy(uri: str, weight_files: list[str], dest: Path,
               throttle: Callable[[int], None]) -> int:
    """Downloads the whole checkpoint at ``uri`` into the new directory ``dest``, every byte
    through ``throttle`` (the node's link), as a serverless-vLLM-style cold start does: no
    copy is kept for the next start. A ``file://`` checkpoint is read through the same
    throttle (the store is on this machine). Returns the bytes moved."""
    dest.mkdir(parents=True)
    parsed = urlparse(uri)
    moved = 0
    with requests.Session() as http:
        for name in (*SMALL_FILES, *weight_files):
            required = name in weight_files or name == "config.json"
            if parsed.scheme == "file":
                moved += _copy(Path(unquote(parsed.path)) / name, dest / name, required, throttle)
            else:
                moved += _download(http, f"{uri.rstrip('/')}/{name}", dest / name, required,
                                   throttle)
    return moved


def _copy(src: Path, path: Path, required: bool, throttle: Callable[[int], None]) -> int:
    if not src.is_file() and not required:
        return 0
    moved = 0
    with open(src, "rb") as inp, open(path, "wb") as out:
        while chunk := inp.read(CHUNK):
            throttle(len(chunk))
            out.write(chunk)
            moved += len(chunk)
    return moved


def _download(http: requests.Session, url: str, path: Path, required: bool,
              throttle: Callable[[int], None] | None = None) -> int:
    moved = 0
    with http.get(url, stream=True, timeout=60) as resp:
        if resp.status_code == 404 and not required:
            return 0
        resp.raise_for_status()
        with open(path, "wb") as f:
            for chunk in resp.iter_content(CHUNK):
                if throttle is not None:
                    throttle(len(chunk))
                f.write(chunk)
                moved += len(chunk)
    return moved
