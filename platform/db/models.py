"""Every table, imported in one place so ``Base.metadata`` is complete (Alembic reads it)."""

from hydraserve.db.base import Base
from hydraserve.db.billing import Price, UsageRecord
from hydraserve.db.cluster import Device, Instance, Node, Plan
from hydraserve.db.registry import Function, FunctionVersion, Model
from hydraserve.db.serving import Invocation
from hydraserve.db.tenants import ApiKey, Tenant

__all__ = [
    "Base", "Tenant", "ApiKey", "Model", "Function", "FunctionVersion", "Node", "Device",
    "Plan", "Instance", "Invocation", "UsageRecord", "Price",
]
