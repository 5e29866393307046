"""Celery app, per-node queue routing and task definitions. Empty until the serving path lands
(see docs/architecture.md)."""
