"""The Celery app: node tasks travel on per-node queues ``node.<id>``.

Tasks are acked late and rejected when their worker dies, so a node agent killed mid-task gets
the task again when it comes back; each task checks Postgres first, so a repeat is harmless.
"""

from __future__ import annotations

from celery import Celery

from hydraserve.settings import Settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("hydraserve", broker=settings.broker_url, include=["hydraserve.tasks.node_tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_default_queue="control",
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # no remote-control mailbox: its exclusive queue is named after the host, which would
        # clash between clusters that share a broker
        worker_enable_remote_control=False,
    )
    return app


celery_app = make_celery(Settings.from_env())
