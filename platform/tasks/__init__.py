"""Celery app and its thin node tasks (``node_tasks``), and what runs on a node (``node``)."""
