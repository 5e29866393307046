"""Data for the console's browser tests, written through the services into the database of the
``api_server`` fixture: two tenants, functions, a node with a live group, invocations (one cold
with a full timeline), usage records in a past window and a price."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy.orm import Session

GIB = 1 << 30
T0 = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)  # the usage window: 2026-11-01 .. 2026-11-04
# TTFTs of acme/chat's invocations: the cold one first; its SLO (v2) is 800 ms
TTFTS_MS = (1000, 50, 60, 70, 2000)


@dataclass(frozen=True)
class Seed:
    acme_key: str
    globex_key: str
    cold_id: str  # acme's cold invocation
    warm_id: str  # acme's first warm invocation
    globex_id: str  # globex's invocation


def seed(session: Session, settings) -> Seed:
    from hydraserve.billing.prices import add_price
    from hydraserve.cluster import service as cluster
    from hydraserve.functions.schemas import FunctionCreate, FunctionPatch
    from hydraserve.functions.service import register_function, update_function
    from hydraserve.tenants.service import authenticate, create_tenant, issue_key

    keys, fns = {}, {}
    for tenant, name in (("acme", "chat"), ("globex", "secret-fn")):
        _, keys[tenant] = issue_key(session, create_tenant(session, tenant), "console")
        who = authenticate(session, keys[tenant])
        body = FunctionCreate.model_validate({
            "model": f"file://{settings.store_root}/llama-tiny",
            "slo": {"ttft_ms": 1000, "tpot_ms": 200}})
        fns[tenant] = register_function(session, who, name, body, settings)
    acme = authenticate(session, keys["acme"])
    chat = update_function(session, acme, "chat", FunctionPatch.model_validate(
        {"slo": {"ttft_ms": 800}}), settings)  # v2, the alias
    v2 = next(v for v in chat.versions if v.version == 2)

    cluster.register(session, "node-a", "127.0.0.1", 800.0,
                     [cluster.DeviceSpec(0, "cpu", 8 * GIB), cluster.DeviceSpec(1, "cpu", 8 * GIB)],
                     {"cached_stages": ["m1-0123abcd/0"], "link_bytes": 3 * 2**20,
                      "link_mb_per_s": 95.5})
    dev0 = _device_id(session, "node-a", 0)
    (inst,) = cluster.record_group(session, v2, 1, [cluster.StageRecord(
        0, "node-a", dev0, GIB, True, 1000, 10.0)], "console test", 0.5, 0.05)
    t0 = T0.timestamp()  # the stage's cold start, as the cold invocation saw it
    cluster.mark_ready(session, (inst.id,), {"plan": t0 + 0.1, "fetch_start": t0 + 0.15,
                                             "fetch_end": t0 + 0.6, "ready": t0 + 0.95,
                                             "first_token": t0 + 1.0})
    ids = _invocations(session, chat, v2, inst.id)
    globex_id = _invocation(session, fns["globex"], fns["globex"].versions[0], "inv-globex-1",
                            T0, cold=False, ttft_ms=100)
    _usage(session, inst.id, chat, fns["globex"])
    add_price(session, "cpu", Decimal("0.000001"), datetime(2026, 10, 1, tzinfo=UTC))
    session.commit()
    return Seed(keys["acme"], keys["globex"], ids[0], ids[1], globex_id)


def _device_id(session: Session, node_id: str, index: int) -> int:
    from sqlalchemy import select

    from hydraserve.cluster.models import Device

    return session.scalar(select(Device.id).where(Device.node_id == node_id,
                                                  Device.index == index))


def _invocations(session: Session, fn, version, instance_id: int) -> list[str]:
    ids = []
    for i, ttft in enumerate(TTFTS_MS):
        inv_id = "inv-cold-1" if i == 0 else f"inv-warm-{i}"
        _invocation(session, fn, version, inv_id, T0 + timedelta(minutes=i), cold=i == 0,
                    ttft_ms=ttft, instance_id=instance_id)
        ids.append(inv_id)
    return ids


def _invocation(session: Session, fn, version, inv_id: str, queued: datetime, cold: bool,
                ttft_ms: int, instance_id: int | None = None) -> str:
    """A finished invocation; a cold one planned after 100 ms, fetched after 600, loaded after
    900; every one decodes for 500 ms after its first token."""
    from hydraserve.invocations.models import Invocation

    ms = lambda n: queued + timedelta(milliseconds=n)  # noqa: E731
    session.add(Invocation(
        id=inv_id, tenant_id=fn.tenant_id, function_id=fn.id, function_version_id=version.id,
        status="succeeded", request={"prompt": "hello"}, output={"text": "hi"}, cold=cold,
        attempts=1, tokens_in=2, tokens_out=8, instance_ids=[instance_id] if instance_id else [],
        queued_at=queued, planned_at=ms(100) if cold else None,
        fetched_at=ms(600) if cold else None, loaded_at=ms(900) if cold else None,
        first_token_at=ms(ttft_ms), finished_at=ms(ttft_ms + 500)))
    session.flush()
    return inv_id


def _usage(session: Session, instance_id: int, chat, secret) -> None:
    """acme: 2 GB for an hour on Nov 1 (7200 GB-s), 1 GB for half an hour on Nov 2 (1800);
    globex: 1 GB for 1000 s on Nov 1. At 0.000001 USD: 0.0072, 0.0018 and 0.001 USD."""
    from hydraserve.billing.models import UsageRecord

    for fn, gb, start, seconds in ((chat, "2", T0, 3600),
                                   (chat, "1", datetime(2026, 11, 2, tzinfo=UTC), 1800),
                                   (secret, "1", T0, 1000)):
        session.add(UsageRecord(instance_id=instance_id, tenant_id=fn.tenant_id,
                                function_id=fn.id, device_kind="cpu", memory_gb=Decimal(gb),
                                started_at=start, ended_at=start + timedelta(seconds=seconds)))
    session.flush()
