"""What one serving worker runs, read from Postgres: its instance, plan, model and peers."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from gpu_runtime.checkpoint import CheckpointIndex, TensorEntry
from gpu_runtime.config import DTYPES, parse_config
from gpu_runtime.devices import node_device_name
from gpu_runtime.memory import MemoryBudget, workspace_bytes
from hydraserve.cluster.models import Device, Instance, Plan
from hydraserve.db import must_get
from hydraserve.functions.models import FunctionVersion, Model
from hydraserve.tasks.node.model_cache import local_dir

KV_FLOOR_BYTES = 2**20


@dataclass(frozen=True, slots=True)
class Assignment:
    instance_id: int
    plan_id: int
    function_id: int
    function_name: str
    function_version_id: int
    version: int
    model_id: int
    model_uri: str
    fingerprint: str
    weight_files: tuple[str, ...]
    dtype: str
    pp: int
    stage_index: int
    addresses: tuple[str, ...]  # every stage's channel endpoint, stage 0 first
    group: tuple[int, ...]  # instance ids of the pipeline group, by stage
    memory_bytes: int  # this stage's device memory share
    model_bytes: int
    plan_time: float
    policy: str = "hydra"  # the scheduler policy of its plan (scheduler/policies.py)
    consolidation_target: int | None = None  # the pipeline size the group will turn into
    head_memory_bytes: int = 0  # stage 0's share
    device: str = "cpu"  # the planned device, as the worker is told it (gpu_runtime/devices.py)
    workspace_bytes: int = 0  # activations of the largest batch (gpu_runtime/memory.py)

    @property
    def consolidates(self) -> bool:
        return self.pp > 1 and self.consolidation_target == 1

    @property
    def memory(self) -> MemoryBudget:
        """This stage's share: weights, workspace and KV (gpu_runtime/memory.py). A group that
        will consolidate sizes every stage's KV by what stage 0's share leaves after the whole
        model (on every layer, ``plan_group(kv_whole_model=True)``): the blocks of the
        pipeline are then the blocks of the whole model, and nothing outgrows a share."""
        if self.consolidates:
            return MemoryBudget(self.head_memory_bytes, self.model_bytes, self.workspace_bytes)
        return MemoryBudget(self.memory_bytes, self.model_bytes // self.pp, self.workspace_bytes)

    @property
    def workspace_reserved(self) -> bool:
        """Whether the workspace comes out of the share's KV reserve: only while it leaves
        the KV cache at least half of that reserve. A small model whose largest batch's
        activations are as large as its reserve (the demo models: a 4096-token batch of a
        16 MB model; SmolLM2-135M's 49k-token vocabulary) keeps the whole remainder for its
        KV cache, as before the workspace was accounted, and runs without an allocator cap
        (docs/runtime.md): the planner's share does not add the workspace yet."""
        budget = self.memory
        return budget.kv_bytes >= max(KV_FLOOR_BYTES, (budget.share - budget.weights) / 2)

    @property
    def kv_cache_bytes(self) -> int:
        """What the share leaves after the weights and the workspace, never the whole share;
        with a 1 MiB floor so that a tiny model still holds a useful context (the floor is not
        billed)."""
        budget = self.memory
        if self.workspace_reserved:
            return budget.kv_bytes
        return max(budget.share - budget.weights, KV_FLOOR_BYTES)

    def model_dir(self) -> str:
        """A local directory with the checkpoint (downloaded once per node for http(s))."""
        return local_dir(self.model_uri, self.fingerprint, list(self.weight_files))


def load_assignment(session: Session, instance_id: int) -> Assignment:
    inst = must_get(session, Instance, instance_id)
    assert inst.plan_id is not None, f"instance {instance_id} has no plan"
    plan = must_get(session, Plan, inst.plan_id)
    group = list(session.scalars(select(Instance).where(Instance.plan_id == plan.id)
                                 .order_by(Instance.stage_index)))
    version = must_get(session, FunctionVersion, inst.function_version_id)
    model = must_get(session, Model, version.model_id)
    return Assignment(
        instance_id=inst.id, plan_id=plan.id, function_id=version.function_id,
        function_name=version.function.name, function_version_id=version.id, version=version.version, model_id=model.id,
        model_uri=model.uri, fingerprint=model.fingerprint,
        weight_files=tuple(sorted(model.file_sizes)), dtype=model.dtype, pp=plan.pp,
        stage_index=inst.stage_index, addresses=tuple(i.address for i in group),
        group=tuple(i.id for i in group), memory_bytes=inst.memory_bytes,
        model_bytes=model.total_bytes, plan_time=plan.created_at.timestamp(), policy=plan.policy,
        consolidation_target=plan.consolidation_target,
        head_memory_bytes=group[0].memory_bytes if group else inst.memory_bytes,
        device=device_name(session, inst.device_id),
        workspace_bytes=stage_workspace(session, model, plan.pp, inst.stage_index,
                                        plan.consolidation_target == 1 and plan.pp > 1))


def stage_workspace(session: Session, model: Model, pp: int, stage: int, whole: bool) -> int:
    """The workspace of a stage (``whole``: of the whole model, which a consolidating stage
    will hold) at the engine's default batch limits: what an earlier worker of the same
    stage measured on its device (CUDA workers measure it, see gpu_runtime/memory.py), else
    the bound computed from the config."""
    if not whole:
        measured = measured_workspace(session, model.id, pp, stage)
        if measured is not None:
            return measured
    config = parse_config(model.config)
    elem = DTYPES[model.dtype].itemsize if model.dtype in DTYPES else 4
    return workspace_bytes(config, elem, last=whole or stage == pp - 1)


def device_name(session: Session, device_id: int | None) -> str:
    """The worker's name of a registered device (``cpu`` for an instance with none)."""
    if device_id is None:
        return "cpu"
    device = must_get(session, Device, device_id)
    return node_device_name(device.kind, device.index)


def model_index(session: Session, model_id: int) -> CheckpointIndex:
    """The tensor index stored at registration, as the data plane's type."""
    model = must_get(session, Model, model_id)
    tensors = [TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["file"], t["offset"],
                           t["length"], t.get("crc32")) for t in model.tensors]
    return CheckpointIndex(model.uri, model.config, tensors, model.file_sizes, model.file_sha256)


def cache_model(a: Assignment) -> str:
    """The model's name in the node cache: its id (what the planner knows) and fingerprint."""
    return f"m{a.model_id}-{a.fingerprint[:12]}"


def measured_workspace(session: Session, model_id: int, pp: int, stage: int) -> int | None:
    """The workspace the latest worker of this model's stage ``stage`` of ``pp`` measured (a
    CUDA worker's ``memory.workspace_measured``, stored in its timeline), if any."""
    measured = Instance.timeline["memory"]["workspace_measured"]
    row = session.execute(
        select(measured.as_integer()).join(FunctionVersion,
                                           FunctionVersion.id == Instance.function_version_id)
        .join(Plan, Plan.id == Instance.plan_id)
        .where(FunctionVersion.model_id == model_id, Plan.pp == pp,
               Instance.stage_index == stage, measured.as_string().isnot(None))
        .order_by(Instance.id.desc()).limit(1)).scalar()
    return int(row) if row is not None else None
