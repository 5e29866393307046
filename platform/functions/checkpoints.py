"""Model registration: check a checkpoint URI, index it once, store the tensor index."""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path
from urllib.parse import unquote, urlparse

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gpu_runtime.checkpoint import CheckpointError, CheckpointIndex, Source, index_checkpoint
from gpu_runtime.config import parse_config
from gpu_runtime.errors import UnsupportedModelError
from hydraserve.errors import InvalidModel, InvalidRequest
from hydraserve.functions import stores
from hydraserve.functions.models import Model
from hydraserve.settings import Settings

SCHEMES = ("file", "http", "https")
DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def check_model_uri(uri: str, settings: Settings) -> str:
    """Rejects URIs we must not or cannot read, before touching the network or disk."""
    parsed = urlparse(uri)
    if parsed.scheme not in SCHEMES:
        raise InvalidRequest(
            f"model URI {uri!r} has scheme {parsed.scheme!r}; allowed schemes: {list(SCHEMES)} "
            "(e.g. file:///models/llama or http://store:9000/llama)", "model")
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path)).resolve()
        roots = settings.allowed_model_roots
        if not any(path == root or root in path.parents for root in roots):
            raise InvalidRequest(
                f"model path {str(path)!r} is outside the model store; file:// URIs must point "
                f"into one of {[str(r) for r in roots]} (HYDRA_STORE_ROOT, HYDRA_MODEL_ROOTS)",
                "model")
    elif not parsed.netloc:
        raise InvalidRequest(f"model URI {uri!r} has no host", "model")
    else:  # the API fetches what it is given: only model stores the operator named
        stores.check_store_url(uri, settings)
    return uri.rstrip("/")


def check_architecture(index: CheckpointIndex) -> None:
    """The checkpoint is one the runtime can serve: its config.json goes through the runtime's
    own parser (gpu_runtime.config, the one every worker uses), so what registers also starts."""
    try:
        config = parse_config(index.config)
    except UnsupportedModelError as exc:
        raise InvalidModel(f"config.json: {exc.message}", "model") from None
    except KeyError as exc:
        raise InvalidModel(f"config.json of this {index.architecture} lacks the field "
                           f"{exc.args[0]!r}", "model") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise InvalidModel(f"config.json of this {index.architecture} has a field of the wrong "
                           f"type ({type(exc).__name__}: {str(exc)[:120]})", "model") from None
    not_ints = [f.name for f in fields(config) if f.type == "int"
                and (not isinstance(getattr(config, f.name), int)
                     or isinstance(getattr(config, f.name), bool))]
    if not_ints:
        raise InvalidModel(f"config.json of this {index.architecture} has non-integer sizes "
                           f"{not_ints}", "model")
    if not index.tensors:
        raise InvalidModel("the checkpoint's safetensors files hold no tensors", "model")
    dtypes = {t.dtype for t in index.tensors}
    if not dtypes <= set(DTYPE_NAMES):
        raise InvalidModel(
            f"tensor dtypes {sorted(dtypes)} are not servable; allowed: {sorted(DTYPE_NAMES)}",
            "model")


def fingerprint(index: CheckpointIndex) -> str:
    digest = hashlib.sha256()
    for name in sorted(index.file_sha256):
        digest.update(f"{name}:{index.file_sha256[name]};".encode())
    return digest.hexdigest()


def index_model(uri: str, settings: Settings) -> CheckpointIndex:
    def redirect_ok(url: str) -> bool:
        return stores.is_allowed(url, settings)

    try:
        index = index_checkpoint(uri, timeout_s=settings.registration_timeout_s,
                                 redirect_ok=redirect_ok)
        if not Source(uri, redirect_ok=redirect_ok).exists("tokenizer.json"):
            raise InvalidModel(
                f"tokenizer.json is missing from {uri}; the runtime needs a fast tokenizer file",
                "model")
    except CheckpointError as exc:
        raise InvalidModel(exc.message, exc.param or "model") from exc
    check_architecture(index)
    return index


def ensure_model(session: Session, uri: str, settings: Settings) -> Model:
    """Returns the Model row for ``uri`` as it is now, indexing it if these bytes are new; no
    commit (the registration that needs it commits both)."""
    uri = check_model_uri(uri, settings)
    index = index_model(uri, settings)
    fp = fingerprint(index)
    model = session.scalar(select(Model).where(Model.uri == uri, Model.fingerprint == fp))
    if model is not None:
        return model
    main_dtype = max(DTYPE_NAMES, key=lambda d: sum(t.length for t in index.tensors if t.dtype == d))
    model = Model(
        uri=uri, fingerprint=fp, architecture=index.architecture, dtype=DTYPE_NAMES[main_dtype],
        config=index.config, total_bytes=index.total_bytes,
        num_parameters=sum(_numel(t.shape) for t in index.tensors),
        tensors=index.to_json(), file_sizes=index.file_sizes, file_sha256=index.file_sha256)
    try:
        with session.begin_nested():  # a concurrent registration may insert the same bytes
            session.add(model)
    except IntegrityError:
        model = session.scalar(select(Model).where(Model.uri == uri, Model.fingerprint == fp))
        assert model is not None, f"model {uri} {fp} vanished after a unique violation"
    return model


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
