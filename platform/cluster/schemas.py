"""Response schemas of the instance API (``GET /v1/admin/instances``) and the group block of
an invocation: where a request ran, and what became of its pipeline (consolidation)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from gpu_runtime.devices import node_device_name
from hydraserve.cluster.consolidation import record_of
from hydraserve.cluster.models import Device, Instance, Plan
from hydraserve.functions.models import FunctionVersion


class Consolidation(BaseModel):
    state: Literal["pending", "consolidating", "consolidated", "skipped", "failed"] = Field(
        description="pending until the group is ready; then consolidating and consolidated, "
                    "or skipped / failed (the group stays a pipeline; reason says why)")
    target_pp: int | None = Field(description="the pipeline size it turns into (1: standalone)")
    reason: str | None
    started_at: str | None
    consolidated_at: str | None
    stats: dict[str, Any] = Field(description="the fetch of the rest and the switch: blocks and "
                                              "bytes migrated, the pause, timestamps")


class GroupOut(BaseModel):
    plan_id: int
    pp: int = Field(description="the pipeline size it was started with")
    policy: str
    consolidation: Consolidation | None


class InstanceOut(BaseModel):
    object: Literal["instance"] = "instance"
    id: int
    function: str
    version: int
    node_id: str
    stage_index: int
    num_stages: int = Field(description="stages of its group now (1 once consolidated)")
    memory_bytes: int
    device: str | None = Field(description="the device its plan placed it on, as the worker is "
                                           "told it: cpu:N (a slice of the node's cores) or "
                                           "cuda:N")
    runs_on: dict[str, Any] | None = Field(
        description="what the worker reported once bound: device, and its cores and threads "
                    "(CPU) or allocator cap (CUDA); None until it has loaded")
    memory: dict[str, Any] | None = Field(
        description="what the worker reported its share holds: share, weights, workspace "
                    "(the bound; workspace_measured on CUDA) and kv, in bytes")
    status: str
    created_at: datetime
    ready_at: datetime | None
    released_at: datetime | None
    error: str | None
    group: GroupOut | None


class InstanceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InstanceOut]


def group_out(plan: Plan | None) -> GroupOut | None:
    if plan is None:
        return None
    record = record_of(plan)
    return GroupOut(plan_id=plan.id, pp=plan.pp, policy=plan.policy,
                    consolidation=Consolidation(**record) if record else None)


def instance_out(i: Instance, fv: FunctionVersion, plan: Plan | None,
                 device: Device | None) -> InstanceOut:
    runs_on, memory = ((i.timeline or {}).get(k) for k in ("device", "memory"))
    return InstanceOut(id=i.id, function=fv.function.name, version=fv.version,
                       node_id=i.node_id, stage_index=i.stage_index, num_stages=i.num_stages,
                       memory_bytes=i.memory_bytes,
                       device=node_device_name(device.kind, device.index) if device else None,
                       runs_on=runs_on if isinstance(runs_on, dict) else None,
                       memory=memory if isinstance(memory, dict) else None,
                       status=i.status, created_at=i.created_at,
                       ready_at=i.ready_at, released_at=i.released_at, error=i.error,
                       group=group_out(plan))
