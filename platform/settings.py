"""One typed settings object, read from ``HYDRA_*`` environment variables.

Defaults work on a single development machine: Postgres and RabbitMQ on 127.0.0.1 with their
stock credentials, the model store under ``.demo/models`` of the working directory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

# threads of an API process: a waiting sync or streaming invocation holds one, idle (its client
# waits on the reply queue), so there are many; fair shares keep a tenant to its part of them
DEFAULT_API_THREADS = 64


POLICIES = ("hydra", "pp1", "sequential")  # scheduler/policies.py


class SettingsError(ValueError):
    """A ``HYDRA_*`` variable holds a value we cannot use."""


def _env_int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer; allowed: {low}..{high}") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is out of range; allowed: {low}..{high}")
    return value


SWITCH = {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False}


def _env_switch(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw not in SWITCH:
        raise SettingsError(f"{name}={raw!r} is not a switch; allowed: on, off (or 1, 0, "
                            "true, false)")
    return SWITCH[raw]


DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/hydraserve"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _default_store_root() -> str:
    return str(Path.cwd() / ".demo" / "models")


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    admin_key: str | None = None  # bootstraps an admin API key when set
    store_root: str = field(default_factory=_default_store_root)
    store_url: str | None = None  # http(s) base URL of the model store, when one runs
    model_roots: tuple[str, ...] = ()  # extra directories file:// model URIs may point into
    api_port: int = 8000
    registration_timeout_s: int = 60
    sync_deadline_s: int = 30  # a sync invocation answers 202 + id after this long
    queue_prefix: str = ""  # namespaces queues when several clusters share one RabbitMQ
    max_queue_s: int = 900  # a request not started by then fails, with the reason recorded
    # http(s) model stores registration may read, host[:port] (no port: 80/443; host:* any);
    # the default is the local model store of `make up`
    model_hosts: tuple[str, ...] = ("127.0.0.1:8300", "localhost:8300")
    max_body_bytes: int = 8 << 20  # a larger request body is answered 413
    auth_failures_per_minute: int = 20  # per client address and API process, then 429
    # an API process's request threads (gunicorn_conf.py), shared fairly between tenants
    api_threads: int = DEFAULT_API_THREADS
    # invocations queued or running across the cluster beyond which tenants get fair shares
    # (tenants/fairness.py); 0 turns the cluster-wide share off
    cluster_max_in_flight: int = 512
    # signs the console's session cookie; unset: derived from admin_key (docs/console.md)
    console_secret: str | None = None
    console_idle_minutes: int = 30  # a console session unused this long must log in again
    # how the scheduler starts functions (scheduler/policies.py): hydra, pp1 or sequential
    scheduler_policy: str = "hydra"
    # whether pipelines consolidate into standalone replicas once ready (docs/consolidation.md)
    consolidation: bool = True

    def __post_init__(self) -> None:
        if not self.database_url.startswith("postgresql"):
            raise SettingsError(
                f"HYDRA_DATABASE_URL={self.database_url!r} is not a PostgreSQL URL; "
                "use postgresql+psycopg://user@host:port/dbname")
        if not self.broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
            raise SettingsError(
                f"HYDRA_BROKER_URL={self.broker_url!r} is not an AMQP URL; "
                "use amqp://user:password@host:5672//")
        if self.admin_key is not None and len(self.admin_key) < 16:
            raise SettingsError("HYDRA_ADMIN_KEY must be at least 16 characters long")
        if self.scheduler_policy not in POLICIES:
            raise SettingsError(f"HYDRA_SCHEDULER_POLICY={self.scheduler_policy!r} is not a "
                                f"policy; allowed: {', '.join(POLICIES)}")
        if self.console_secret is not None and len(self.console_secret) < 32:
            raise SettingsError("HYDRA_CONSOLE_SECRET must be at least 32 characters long; "
                                "make one with: python -c 'import secrets; "
                                "print(secrets.token_urlsafe(32))'")

    @property
    def console_signing_key(self) -> bytes | None:
        """The key that signs console sessions: HYDRA_CONSOLE_SECRET, else one derived from
        HYDRA_ADMIN_KEY (the same in every API process, unlike a random per-process one);
        None when neither is set, and the console then refuses to log anyone in."""
        if self.console_secret is not None:
            return self.console_secret.encode()
        if self.admin_key is not None:
            return hmac.new(self.admin_key.encode(), b"hydraserve console session v1",
                            hashlib.sha256).digest()
        return None

    @property
    def allowed_model_roots(self) -> tuple[Path, ...]:
        """Directories a ``file://`` model URI may point into."""
        return tuple(Path(p).resolve() for p in (self.store_root, *self.model_roots))

    @classmethod
    def from_env(cls, **overrides: object) -> "Settings":
        env = os.environ
        values: dict[str, object] = {
            "database_url": env.get("HYDRA_DATABASE_URL") or DEFAULT_DATABASE_URL,
            "broker_url": env.get("HYDRA_BROKER_URL") or DEFAULT_BROKER_URL,
            "admin_key": env.get("HYDRA_ADMIN_KEY") or None,
            "store_root": env.get("HYDRA_STORE_ROOT") or _default_store_root(),
            "store_url": env.get("HYDRA_STORE_URL") or None,
            "model_roots": tuple(p for p in env.get("HYDRA_MODEL_ROOTS", "").split(":") if p),
            "api_port": _env_int("HYDRA_API_PORT", 8000, 1, 65535),
            "registration_timeout_s": _env_int("HYDRA_REGISTRATION_TIMEOUT_S", 60, 1, 3600),
            "sync_deadline_s": _env_int("HYDRA_SYNC_DEADLINE_S", 30, 0, 600),
            "queue_prefix": env.get("HYDRA_QUEUE_PREFIX", ""),
            "max_queue_s": _env_int("HYDRA_MAX_QUEUE_S", 900, 1, 7 * 86_400),
            "model_hosts": tuple(h for h in env.get(
                "HYDRA_MODEL_HOSTS", "127.0.0.1:8300,localhost:8300").split(",") if h),
            "max_body_bytes": _env_int("HYDRA_MAX_BODY_BYTES", 8 << 20, 1024, 1 << 30),
            "auth_failures_per_minute": _env_int("HYDRA_AUTH_FAILURES_PER_MINUTE", 20, 1,
                                                 1_000_000),
            "api_threads": _env_int("HYDRA_API_THREADS", DEFAULT_API_THREADS, 1, 1024),
            "cluster_max_in_flight": _env_int("HYDRA_CLUSTER_MAX_IN_FLIGHT", 512, 0, 10_000_000),
            "console_secret": env.get("HYDRA_CONSOLE_SECRET") or None,
            "console_idle_minutes": _env_int("HYDRA_CONSOLE_IDLE_MINUTES", 30, 1, 7 * 24 * 60),
            "scheduler_policy": env.get("HYDRA_SCHEDULER_POLICY", "hydra"),
            "consolidation": _env_switch("HYDRA_CONSOLIDATION", True),
        }
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise SettingsError(f"unknown settings {sorted(unknown)}; known: {sorted(known)}")
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
