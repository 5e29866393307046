"""Tenants and API keys: creation, key issue and lookup, admin bootstrap."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hydraserve.db import utcnow
from hydraserve.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound
from hydraserve.tenants.limits import FIELDS as LIMIT_FIELDS
from hydraserve.tenants.limits import Limits
from hydraserve.tenants.models import ROLES, ApiKey, Tenant
from hydraserve.validation import check_name

KEY_PREFIX = "hs_"
MAX_ID = 2**31 - 1  # Postgres integer keys
ADMIN_TENANT = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant a key belongs to and the key's role."""

    tenant_id: int
    tenant_name: str
    role: str
    key_id: int
    limits: Limits = Limits()

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(30)


def create_tenant(session: Session, name: str) -> Tenant:
    check_name(name, "name", "tenant name")
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"tenant {name!r} already exists; pick another name", "name") from None
    session.commit()
    return tenant


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.name)))


def get_tenant(session: Session, name: str) -> Tenant:
    check_name(name, "tenant", "tenant name")
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound(f"tenant {name!r} not found", "tenant")
    return tenant


def issue_key(session: Session, tenant: Tenant, name: str = "", role: str = "tenant") -> tuple[ApiKey, str]:
    """Creates a key for ``tenant``; returns the row and the key itself (shown only once)."""
    if role not in ROLES:
        raise InvalidRequest(f"role {role!r} is not allowed; use one of {list(ROLES)}", "role")
    key = new_key()
    row = ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10], role=role, name=name)
    session.add(row)
    session.commit()
    return row, key


def set_limits(session: Session, name: str, limits: dict[str, int]) -> Tenant:
    """Sets some of a tenant's limits (``tenants.limits.FIELDS``) and commits; the next
    invocation is admitted against them."""
    unknown = set(limits) - set(LIMIT_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown limits {sorted(unknown)}; known: {list(LIMIT_FIELDS)}",
                             "limits")
    tenant = get_tenant(session, name)
    for field, value in limits.items():
        setattr(tenant, field, value)
    session.commit()
    return tenant


def revoke_key(session: Session, key_id: int) -> ApiKey:
    row = session.get(ApiKey, key_id) if 0 < key_id <= MAX_ID else None
    if row is None:
        raise NotFound(f"API key {key_id} not found", "key_id")
    row.revoked_at = row.revoked_at or utcnow()
    session.commit()
    return row


KEY_LOOKUP = (select(Tenant.id, Tenant.name, ApiKey.role, ApiKey.id.label("key_id"),
                     ApiKey.key_hash,
                     *(getattr(Tenant, f) for f in LIMIT_FIELDS)).join(Tenant)
              .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None)))


def authenticate(session: Session, key: str) -> Principal:
    """The key's principal (every request pays for this: a statement built once, plain
    columns, run on the session's Core connection, no ORM execution context)."""
    digest = hash_key(key)
    row = session.connection().execute(KEY_LOOKUP, {"key_hash": digest}).first()
    # the lookup is by the key's sha256, so its timing says nothing of the key; the comparison
    # of what came back is constant-time all the same
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        raise AuthenticationFailed("invalid API key; check the key or ask an admin for a new one")
    tenant_id, tenant_name, role, key_id, _hash, *limits = row
    return Principal(tenant_id, tenant_name, role, key_id, Limits(*limits))


def bootstrap_admin_key(session: Session, key: str) -> None:
    """Makes ``key`` a valid admin key of the ``admin`` tenant. Idempotent and race-free, so
    every API worker may call it at start."""
    session.execute(insert(Tenant).values(name=ADMIN_TENANT, max_concurrency=256,
                                          created_at=utcnow()).on_conflict_do_nothing())
    tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == ADMIN_TENANT))
    session.execute(insert(ApiKey).values(
        tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:10], role="admin",
        name="bootstrap", created_at=utcnow()).on_conflict_do_nothing())
    session.commit()
