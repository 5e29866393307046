"""Node tasks (thin: take ids, call the node agent)."""

from __future__ import annotations

from hydraserve.tasks.celery_app import celery_app
from hydraserve.tasks.node.agent import agent


@celery_app.task(name="node.start_stage")
def start_stage(instance_id: int) -> None:
    """Start the worker process of one pipeline stage (or a whole model) on this node."""
    agent().start_stage(instance_id)


@celery_app.task(name="node.stop_stage")
def stop_stage(instance_id: int, kill: bool = False) -> None:
    """Stop a worker: gracefully (finish in-flight requests), or at once when its group broke."""
    agent().stop_stage(instance_id, kill)


@celery_app.task(name="node.consolidate")
def consolidate(instance_id: int) -> None:
    """Fetch the rest of the model for a ready pipeline's stage 0 here, which then turns the
    pipeline into a standalone replica (docs/consolidation.md)."""
    agent().consolidate(instance_id)
