"""Which http(s) model stores the API may read, so that registering a URI cannot make the API
probe another service. The operator names the stores (``HYDRA_MODEL_HOSTS``, and the host of
``HYDRA_STORE_URL``) as ``host[:port]``: no port means the scheme's default (80 or 443),
``host:*`` any port. A URI passes when its port is allowed for an entry and, once resolved,
every address of its host is an address of such an entry (``127.1`` or a name that points at
a local address does not slip past a list of names). Redirects are followed only to URLs that
pass the same check."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from hydraserve.errors import InvalidRequest
from hydraserve.settings import Settings

DEFAULT_PORTS = {"http": 80, "https": 443}


def entries(settings: Settings) -> list[tuple[str, str]]:
    """(host, port) of every allowed store; port is digits, ``*`` or ``""`` (the default)."""
    raw = list(settings.model_hosts)
    if settings.store_url:
        raw.append(urlsplit(settings.store_url).netloc)
    out = []
    for entry in raw:
        host, port = (entry[:-2], "*") if entry.endswith(":*") else (entry, "")
        if not port:
            parts = urlsplit(f"//{entry}")
            host, port = parts.hostname or "", str(parts.port or "")
        out.append((host.strip("[]").lower(), port))
    return out


def addresses(host: str) -> set[str]:
    """Every address ``host`` resolves to (none when it does not)."""
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return set()


def check_store_url(url: str, settings: Settings) -> None:
    """Raises InvalidRequest unless ``url`` is on an allowed model store."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        raise InvalidRequest(f"model URI {url[:200]!r} has an invalid port", "model") from None
    allowed = sorted(f"{h}:{p or 'default'}" for h, p in entries(settings))
    why = (f"model store {host}:{port} is not an allowed model store; allowed: {allowed} "
           "(HYDRA_MODEL_HOSTS, HYDRA_STORE_URL)")
    on_port = [h for h, p in entries(settings)
               if p == "*" or (p and int(p) == port) or (not p and port in (80, 443))]
    if not on_port:
        raise InvalidRequest(why, "model")
    resolved = addresses(host)
    if not resolved:
        raise InvalidRequest(f"model store host {host!r} does not resolve", "model")
    if host not in on_port and not resolved <= set().union(*(addresses(h) for h in on_port)):
        raise InvalidRequest(why, "model")


def is_allowed(url: str, settings: Settings) -> bool:
    try:
        check_store_url(url, settings)
    except InvalidRequest:
        return False
    return True
