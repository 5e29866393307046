"""Every table, imported in one place so ``Base.metadata`` is complete (Alembic reads it)."""

from hydraserve.billing.models import Price, UsageRecord
from hydraserve.cluster.models import Device, Instance, ModelProfile, Node, Plan, PlannerMeasurement
from hydraserve.db import Base
from hydraserve.functions.models import Function, FunctionVersion, Model
from hydraserve.invocations.models import Invocation
from hydraserve.tenants.models import ApiKey, Tenant, TenantUsage

__all__ = [
    "Base", "Tenant", "ApiKey", "Model", "Function", "FunctionVersion", "Node", "Device",
    "Plan", "Instance", "Invocation", "UsageRecord", "Price", "TenantUsage", "ModelProfile",
    "PlannerMeasurement",
]
