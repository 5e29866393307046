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


def _download(http: requests.Session, url: str, path: Path, required: bool) -> None:
    with http.get(url, stream=True, timeout=60) as resp:
        if resp.status_code == 404 and not required:
            return
        resp.raise_for_status()
        with open(path, "wb") as f:
            for chunk in resp.iter_content(CHUNK):
                f.write(chunk)
