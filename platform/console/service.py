"""Read use cases of the console. A tenant's principal sees its own functions, invocations and
live groups; an admin's sees every tenant's, and the nodes. Nothing here commits."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from hydraserve.billing.times import iso_utc
from hydraserve.cluster.models import LIVE, Device, Instance, Node, Plan
from hydraserve.cluster.service import live_groups
from hydraserve.console.figures import (
    TimelineRow,
    TtftSummary,
    invocation_phases,
    stage_row,
    ttft_summary,
)
from hydraserve.errors import NotFound
from hydraserve.functions.models import Function, FunctionVersion
from hydraserve.invocations.models import Invocation
from hydraserve.tenants.limits import FIELDS as LIMIT_FIELDS
from hydraserve.tenants.limits import Limits
from hydraserve.tenants.models import ApiKey, Tenant
from hydraserve.tenants.service import Principal

RECENT = 50  # invocations a function's page lists and summarises


def principal_of_key(session: Session, key_id: int, tenant_id: int) -> Principal | None:
    """The principal of a console session: its key, if still unrevoked and of ``tenant_id``
    (a revoked key ends the sessions it opened at their next request)."""
    row = session.execute(
        select(Tenant.id, Tenant.name, ApiKey.role, ApiKey.id,
               *(getattr(Tenant, f) for f in LIMIT_FIELDS)).join(Tenant)
        .where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id,
               ApiKey.revoked_at.is_(None))).first()
    if row is None:
        return None
    tid, name, role, kid, *limits = row
    return Principal(tid, name, role, kid, Limits(*limits))


# ---- cluster -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DeviceView:
    index: int
    kind: str
    memory_bytes: int
    used_bytes: int  # held by live instances

    @property
    def free_bytes(self) -> int:
        return max(self.memory_bytes - self.used_bytes, 0)


@dataclass(frozen=True, slots=True)
class NodeView:
    id: str
    status: str
    last_heartbeat_at: str | None
    devices: list[DeviceView]
    link_mbps: float | None = None  # the link's cap; None: uncapped
    link_bytes: int = 0  # fetched since the agent started (its heartbeat)
    link_mb_per_s: float | None = None  # its last fetches' rate
    cached_stages: list[str] = field(default_factory=list)  # the node cache's contents


@dataclass(frozen=True, slots=True)
class StageView:
    stage: int
    instance_id: int
    node_id: str
    device_id: int | None
    memory_bytes: int
    status: str


@dataclass(frozen=True, slots=True)
class GroupView:
    plan_id: int
    tenant: str
    function: str
    version: int
    stages: list[StageView]
    pipeline: str = ""  # what the group is: standalone, a pipeline, consolidating, ...


@dataclass(frozen=True, slots=True)
class ClusterView:
    nodes: list[NodeView]  # admins only; empty for a tenant
    groups: list[GroupView]
    now: str = field(default="")


def pipeline_text(plan: Plan | None) -> str:
    """One line on what a group is: standalone, a replica, a pipeline and what became of it."""
    if plan is None:
        return ""
    if plan.pp == 1:
        return plan.reason.split(":")[0] if plan.reason.startswith("replica of plan") \
            else "standalone"
    state = plan.consolidation_state
    if state == "consolidated":
        return f"pp {plan.pp}, consolidated into a standalone replica"
    if state == "consolidating":
        return f"pp {plan.pp}, consolidating"
    if state in ("skipped", "failed"):
        return f"pp {plan.pp}, stays a pipeline: {plan.consolidation_reason}"
    return f"pp {plan.pp}" + (", will consolidate once ready" if plan.consolidation_target
                              else "")


def cluster_view(session: Session, who: Principal, now: datetime) -> ClusterView:
    """Nodes with their devices' memory used and free (admins), and the live groups with their
    stages (a tenant: its own)."""
    names = _version_names(session)
    live = live_groups(session)
    plans = {p.id: p for p in session.scalars(select(Plan).where(Plan.id.in_(list(live))))}
    groups = []
    for plan_id, instances in sorted(live.items()):
        tenant_id, tenant, fn, version = names[instances[0].function_version_id]
        if who.is_admin or tenant_id == who.tenant_id:
            groups.append(GroupView(plan_id, tenant, fn, version, [
                StageView(i.stage_index, i.id, i.node_id, i.device_id, i.memory_bytes, i.status)
                for i in instances], pipeline_text(plans.get(plan_id))))
    nodes = _nodes(session) if who.is_admin else []
    return ClusterView(nodes, groups, iso_utc(now))


def _version_names(session: Session) -> dict[int, tuple[int, str, str, int]]:
    rows = session.execute(
        select(FunctionVersion.id, Tenant.id, Tenant.name, Function.name, FunctionVersion.version)
        .join(Function, Function.id == FunctionVersion.function_id)
        .join(Tenant, Tenant.id == Function.tenant_id)
        .where(FunctionVersion.id.in_(select(Instance.function_version_id)
                                      .where(Instance.status.in_(LIVE)))))
    return {fv: (tid, tenant, fn, v) for fv, tid, tenant, fn, v in rows}


def _nodes(session: Session) -> list[NodeView]:
    used = {device_id: int(total) for device_id, total in session.execute(
        select(Instance.device_id, func.sum(Instance.memory_bytes))
        .where(Instance.status.in_(LIVE)).group_by(Instance.device_id)).tuples()}
    devices: dict[str, list[DeviceView]] = {}
    for d in session.scalars(select(Device).order_by(Device.node_id, Device.index)):
        devices.setdefault(d.node_id, []).append(
            DeviceView(d.index, d.kind, d.memory_bytes, used.get(d.id, 0)))
    return [NodeView(n.id, n.status, iso_utc(n.last_heartbeat_at) if n.last_heartbeat_at
                     else None, devices.get(n.id, []), n.link_mbps,
                     int((n.info or {}).get("link_bytes") or 0),
                     (n.info or {}).get("link_mb_per_s"),
                     [str(x) for x in (n.info or {}).get("cached_stages") or []])
            for n in session.scalars(select(Node).order_by(Node.id))]


# ---- functions -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FunctionRow:
    tenant: str
    function: Function
    alias: FunctionVersion
    ttft: TtftSummary


@dataclass(frozen=True, slots=True)
class FunctionDetail:
    tenant: str
    function: Function
    versions: list[FunctionVersion]
    invocations: list[tuple[Invocation, int, float | None]]  # (row, version, ttft_ms)
    ttft: TtftSummary
    tpot: TtftSummary  # the same summary of time per output token, against the TPOT SLO


def list_functions(session: Session, who: Principal) -> list[FunctionRow]:
    """Live functions by tenant and name (a tenant: its own), each with the TTFTs of its recent
    invocations against their versions' SLO."""
    q = (select(Function, Tenant.name).join(Tenant, Tenant.id == Function.tenant_id)
         .where(Function.deleted_at.is_(None)).order_by(Tenant.name, Function.name)
         .options(selectinload(Function.versions)))
    if not who.is_admin:
        q = q.where(Function.tenant_id == who.tenant_id)
    return [FunctionRow(tenant, fn, fn.alias_spec(), ttft_summary(_samples(
        _recent(session, fn.id)))) for fn, tenant in session.execute(q).tuples()]


def function_detail(session: Session, who: Principal, tenant: str, name: str) -> FunctionDetail:
    """One function with its versions and recent invocations; another tenant's is 404, as a
    function that does not exist."""
    missing = NotFound(f"function {name[:63]!r} of tenant {tenant[:63]!r} not found", "name")
    if not who.is_admin and tenant != who.tenant_name:
        raise missing
    fn = session.scalar(select(Function).join(Tenant, Tenant.id == Function.tenant_id)
                        .where(Tenant.name == tenant, Function.name == name,
                               Function.deleted_at.is_(None))
                        .options(selectinload(Function.versions)))
    if fn is None:
        raise missing
    recent = _recent(session, fn.id)
    return FunctionDetail(tenant, fn, list(fn.versions),
                          [(inv, v, _ttft_ms(inv)) for inv, v, _slo, _tpot in recent],
                          ttft_summary(_samples(recent)), ttft_summary(_tpot_samples(recent)))


def _recent(session: Session, function_id: int) -> list[tuple[Invocation, int, int, int]]:
    """The function's latest invocations with the version each ran and its TTFT and TPOT
    SLOs."""
    rows = session.execute(
        select(Invocation, FunctionVersion.version, FunctionVersion.ttft_ms,
               FunctionVersion.tpot_ms)
        .join(FunctionVersion, FunctionVersion.id == Invocation.function_version_id)
        .where(Invocation.function_id == function_id)
        .order_by(Invocation.queued_at.desc()).limit(RECENT))
    return [(inv, v, slo, tpot) for inv, v, slo, tpot in rows.tuples()]


def _ttft_ms(inv: Invocation) -> float | None:
    ttft = inv.ttft_s()
    return None if ttft is None else ttft * 1000


def _samples(recent: list[tuple[Invocation, int, int, int]]) -> list[tuple[float, int]]:
    return [(t, slo) for inv, _v, slo, _tpot in recent if (t := _ttft_ms(inv)) is not None]


def _tpot_samples(recent: list[tuple[Invocation, int, int, int]]) -> list[tuple[float, int]]:
    """(decode time over the output tokens after the first, TPOT SLO) of each invocation
    with at least two output tokens."""
    return [(tpot * 1000, slo) for inv, _v, _slo, slo in recent
            if (tpot := inv.tpot_s()) is not None]


# ---- invocations ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class InvocationDetail:
    invocation: Invocation
    tenant: str
    function: str
    version: int
    slo_ttft_ms: int
    ttft_ms: float | None
    phases_ms: dict[str, float]
    rows: list[TimelineRow]  # the invocation, then each stage of a cold start
    predicted_ttft_ms: float | None = None  # what the plan of its group predicted


def invocation_detail(session: Session, who: Principal, invocation_id: str) -> InvocationDetail:
    """An invocation with its phases and its stages' timelines; another tenant's is 404."""
    row = session.execute(
        select(Invocation, Tenant.name, Function.name, FunctionVersion.version,
               FunctionVersion.ttft_ms)
        .join(Tenant, Tenant.id == Invocation.tenant_id)
        .join(Function, Function.id == Invocation.function_id)
        .join(FunctionVersion, FunctionVersion.id == Invocation.function_version_id)
        .where(Invocation.id == invocation_id[:40])).first()
    if row is None or not (who.is_admin or row[0].tenant_id == who.tenant_id):
        raise NotFound(f"invocation {invocation_id[:40]!r} not found", "id")
    inv, tenant, fn, version, slo = row
    phases = invocation_phases({"queued_at": inv.queued_at, **{
        attr: getattr(inv, attr) for attr in ("planned_at", "fetched_at", "loaded_at",
                                              "first_token_at", "finished_at")}})
    rows = [TimelineRow("invocation", 0.0, phases)]
    if inv.cold and inv.instance_ids:
        for inst in session.scalars(select(Instance).where(Instance.id.in_(inv.instance_ids))
                                    .order_by(Instance.stage_index)):
            stage = stage_row(inst.stage_index, inst.timeline or {}, inv.queued_at)
            if stage is not None:
                rows.append(stage)
    predicted = None
    if inv.instance_ids:  # the group that served it: the first instance's plan
        predicted = session.scalar(select(Plan.predicted_ttft_ms).join(
            Instance, Instance.plan_id == Plan.id).where(Instance.id == inv.instance_ids[0]))
    return InvocationDetail(inv, tenant, fn, version, slo, _ttft_ms(inv), phases, rows,
                            predicted)
