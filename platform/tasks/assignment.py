"""What one serving worker runs, read from Postgres: its instance, plan, model and peers."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from hydraserve.db.cluster import Instance, Plan
from hydraserve.db.registry import FunctionVersion, Model
from hydraserve.tasks.model_cache import local_dir

KV_FLOOR_BYTES = 2**20


@dataclass(frozen=True, slots=True)
class Assignment:
    instance_id: int
    plan_id: int
    function_id: int
    function_version_id: int
    version: int
    model_dir: str
    dtype: str
    pp: int
    stage_index: int
    addresses: tuple[str, ...]  # every stage's channel endpoint, stage 0 first
    group: tuple[int, ...]  # instance ids of the pipeline group, by stage
    memory_bytes: int  # this stage's device memory share
    model_bytes: int

    @property
    def kv_cache_bytes(self) -> int:
        """What the share leaves after this stage's weights, with a 1 MiB floor so that a tiny
        model still holds a useful context (the floor is not billed)."""
        return max(self.memory_bytes - self.model_bytes // self.pp, KV_FLOOR_BYTES)


def load_assignment(session: Session, instance_id: int) -> Assignment:
    inst = session.get(Instance, instance_id)
    assert inst is not None and inst.plan_id is not None, f"instance {instance_id} has no plan"
    plan = session.get(Plan, inst.plan_id)
    group = list(session.scalars(select(Instance).where(Instance.plan_id == plan.id)
                                 .order_by(Instance.stage_index)))
    version = session.get(FunctionVersion, inst.function_version_id)
    model = session.get(Model, version.model_id)
    return Assignment(
        instance_id=inst.id, plan_id=plan.id, function_id=version.function_id,
        function_version_id=version.id, version=version.version, model_dir=local_dir(model.uri, model.fingerprint, sorted(model.file_sizes)), dtype=model.dtype,
        pp=plan.pp, stage_index=inst.stage_index, addresses=tuple(i.address for i in group),
        group=tuple(i.id for i in group), memory_bytes=inst.memory_bytes,
        model_bytes=model.total_bytes)
