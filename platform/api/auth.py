"""Bearer API keys: who is calling, and may they."""

from __future__ import annotations

from flask import request

from hydraserve.api.context import db, extension
from hydraserve.errors import AuthenticationFailed, PermissionDenied
from hydraserve.tenants.service import Principal, authenticate, hash_key


def bearer_key() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise AuthenticationFailed(
            "missing API key; send the header 'Authorization: Bearer <key>'")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationFailed(
            "malformed Authorization header; expected 'Authorization: Bearer <key>'")
    return key.strip()


def require(role: str) -> Principal:
    """The caller, authenticated; an address with too many recent failures is refused first."""
    failures = extension().auth_failures
    address = request.remote_addr or "unknown"
    failures.check(address)
    key = bearer_key()
    digest = hash_key(key)
    keys = extension().keys
    who = keys.get(digest)
    if who is None:
        try:
            who = authenticate(db(), key)
        except AuthenticationFailed:
            failures.failed(address)
            raise
        keys.put(digest, who)
    if role == "admin" and not who.is_admin:
        raise PermissionDenied("this endpoint needs an admin key; this key is a tenant key")
    return who
