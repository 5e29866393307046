"""Reading stock Hugging Face checkpoints: config.json and safetensors headers.

A checkpoint is addressed by a URI (``file:///dir`` or ``http(s)://host/path``). Indexing reads
each safetensors header (8-byte little-endian length, then JSON) and records, for every tensor,
its file and absolute byte range, so a pipeline stage's fetch can later be planned as byte ranges
of the original files. Nothing is re-partitioned.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import requests

from gpu_runtime.errors import DataPlaneError

SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference reader refuses larger headers
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HASH_CHUNK = 16 * 1024 * 1024


class CheckpointError(DataPlaneError, ValueError):
    """A checkpoint that cannot be read or indexed; ``param`` names the offending input."""

    status = 422


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int  # absolute byte offset in ``file``
    length: int
    crc32: int | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(slots=True)
class CheckpointIndex:
    uri: str
    config: dict
    tensors: list[TensorEntry]
    file_sizes: dict[str, int]
    file_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.length for t in self.tensors)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else str(self.config.get("model_type", ""))

    def to_json(self) -> list[dict]:
        return [asdict(t) | {"shape": list(t.shape)} for t in self.tensors]


MAX_REDIRECTS = 5


class Source:
    """Byte-range access to the files of one checkpoint. A redirect is followed only to a URL
    that ``redirect_ok`` accepts (none without it), so a store cannot send the reader on to a
    service the caller did not mean it to reach."""

    def __init__(self, uri: str, timeout_s: float = 30.0,
                 redirect_ok: Callable[[str], bool] | None = None) -> None:
        self.redirect_ok = redirect_ok
        self.uri = uri.rstrip("/")
        parsed = urlparse(uri)
        self.scheme = parsed.scheme
        if self.scheme == "file":
            self.root = Path(unquote(parsed.path))
            if not self.root.is_dir():
                raise CheckpointError(f"model directory {self.root} does not exist", "model")
        elif self.scheme in ("http", "https"):
            self.session = requests.Session()
        else:
            raise CheckpointError(
                f"unsupported model URI scheme {parsed.scheme!r} in {uri!r}; "
                "use file:///path/to/dir or http(s)://host/path", "model")
        self.timeout_s = timeout_s

    def url(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def exists(self, name: str) -> bool:
        if self.scheme == "file":
            return (self.root / name).is_file()
        resp = self._get(name, headers={"Range": "bytes=0-0"}, allow_missing=True)
        return resp is not None

    def read(self, name: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``name``; the whole file when ``end`` is None."""
        if self.scheme == "file":
            path = self.root / name
            if not path.is_file():
                raise CheckpointError(f"{name} is missing from {self.uri}", "model")
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(-1 if end is None else end - start)
        else:
            rng = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
            resp = self._get(name, headers={"Range": rng})
            data = resp.content
        if end is not None and len(data) != end - start:
            raise CheckpointError(
                f"{name} is truncated: wanted bytes {start}..{end}, got {len(data)} bytes", "model")
        return data

    def size(self, name: str) -> int:
        if self.scheme == "file":
            return (self.root / name).stat().st_size
        resp = self._get(name, headers={"Range": "bytes=0-0"})
        total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        if not total.isdigit():
            raise CheckpointError(f"{self.url(name)} does not answer Range requests", "model")
        return int(total)

    def _get(self, name: str, headers: dict, allow_missing: bool = False):
        url = self.url(name)
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                resp = self.session.get(url, headers=headers, timeout=self.timeout_s,
                                        allow_redirects=False)
            except requests.RequestException as exc:
                # the kind of failure only: its text can say what some other service answered
                raise CheckpointError(f"cannot reach {self.url(name)} "
                                      f"({type(exc).__name__})", "model") from exc
            if not resp.is_redirect:
                break
            target = urljoin(url, resp.headers.get("Location", ""))
            if self.redirect_ok is None or not self.redirect_ok(target):
                raise CheckpointError(f"GET {self.url(name)} redirects to a URL that is not "
                                      "an allowed model store; serve the files from the store "
                                      "itself", "model")
            url = target
        else:
            raise CheckpointError(f"GET {self.url(name)} redirects more than {MAX_REDIRECTS} "
                                  "times", "model")
        if resp.status_code == 404 and allow_missing:
            return None
        if resp.status_code not in (200, 206):
            raise CheckpointError(
                f"GET {self.url(name)} answered HTTP {resp.status_code}", "model")
        return resp


def parse_header(source: Source, name: str) -> tuple[int, dict]:
    """Returns (data start offset, header dict) of one safetensors file."""
    size = source.size(name)
    if size < 8:
        raise CheckpointError(f"{name} is {size} bytes, too short for a safetensors file", "model")
    (header_len,) = struct.unpack("<Q", source.read(name, 0, 8))
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise CheckpointError(
            f"{name}: header length {header_len} does not fit in a {size}-byte file "
            "(truncated or not a safetensors file)", "model")
    try:
        header = json.loads(source.read(name, 8, 8 + header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name}: safetensors header is not valid JSON ({exc})", "model") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: safetensors header is not a JSON object", "model")
    return 8 + header_len, header


def tensors_of_file(source: Source, name: str) -> list[TensorEntry]:
    data_start, header = parse_header(source, name)
    size = source.size(name)
    entries = []
    for tname, meta in header.items():
        if tname == "__metadata__":
            continue
        entries.append(_entry(name, tname, meta, data_start, size))
    return sorted(entries, key=lambda t: t.offset)


def _entry(file: str, tname: str, meta: dict, data_start: int, size: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: tensor {tname!r} has a malformed header entry", "model") from exc
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{file}: tensor {tname!r} has unknown dtype {dtype!r}", "model")
    numel = 1
    for dim in shape:
        numel *= int(dim)
    if end - begin != numel * SAFETENSORS_DTYPES[dtype] or begin < 0:
        raise CheckpointError(
            f"{file}: tensor {tname!r} spans {end - begin} bytes, expected "
            f"{numel * SAFETENSORS_DTYPES[dtype]} for {dtype}{list(shape)}", "model")
    if data_start + end > size:
        raise CheckpointError(
            f"{file}: tensor {tname!r} ends at byte {data_start + end} but the file has {size} "
            "bytes (truncated file)", "model")
    return TensorEntry(tname, dtype, shape, file, data_start + begin, end - begin)


def weight_files(source: Source) -> list[str]:
    if source.exists(INDEX_FILE):
        try:
            weight_map = json.loads(source.read(INDEX_FILE))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{INDEX_FILE} is not a valid shard index ({exc})", "model") from None
        return sorted(set(weight_map.values()))
    if source.exists(SINGLE_FILE):
        return [SINGLE_FILE]
    raise CheckpointError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {source.uri}; a checkpoint needs safetensors "
        "weights in the Hugging Face layout", "model")


def read_config(source: Source) -> dict:
    if not source.exists("config.json"):
        raise CheckpointError(f"config.json is missing from {source.uri}", "model")
    try:
        config = json.loads(source.read("config.json"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"config.json in {source.uri} is not valid JSON ({exc})", "model") from None
    if not isinstance(config, dict):
        raise CheckpointError("config.json must hold a JSON object", "model")
    return config


def index_checkpoint(uri: str, checksums: bool = True, timeout_s: float = 30.0,
                     redirect_ok: Callable[[str], bool] | None = None) -> CheckpointIndex:
    """Reads config and every safetensors header; with ``checksums`` also hashes the bytes
    (sha256 per file, crc32 per tensor) so the prefetcher can verify what it downloads."""
    source = Source(uri, timeout_s, redirect_ok)
    config = read_config(source)
    files = weight_files(source)
    tensors: list[TensorEntry] = []
    sizes: dict[str, int] = {}
    digests: dict[str, str] = {}
    for name in files:
        sizes[name] = source.size(name)
        entries = tensors_of_file(source, name)
        if checksums:
            entries, digests[name] = _checksum_file(source, name, sizes[name], entries)
        tensors.extend(entries)
    return CheckpointIndex(uri, config, tensors, sizes, digests)


def _checksum_file(source: Source, name: str, size: int,
                   entries: list[TensorEntry]) -> tuple[list[TensorEntry], str]:
    sha = hashlib.sha256()
    out = []
    pos = 0
    for t in entries:
        if t.offset > pos:
            sha.update(source.read(name, pos, t.offset))
        crc = 0
        for start in range(t.offset, t.end, HASH_CHUNK):
            chunk = source.read(name, start, min(start + HASH_CHUNK, t.end))
            sha.update(chunk)
            crc = zlib.crc32(chunk, crc)
        out.append(TensorEntry(t.name, t.dtype, t.shape, t.file, t.offset, t.length, crc))
        pos = max(pos, t.end)
    if pos < size:
        sha.update(source.read(name, pos, size))
    return out, sha.hexdigest()
