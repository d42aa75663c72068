"""The worker's Celery app: the service's broker and queue (service/queue.py), plus the
tasks and how a worker consumes them.

`acks_late` + prefetch 1: a task's message is acknowledged after it ran, one at a time
per worker. Redis redelivers an unacknowledged message only after the visibility
timeout (longer than any job); a lost worker is found sooner by its expired lease.
Nothing here imports torch: CUDA is initialised inside the tasks only.
"""

from __future__ import annotations

from celery import Celery

from service.queue import create_celery
from service.settings import Settings


def create_worker_app(settings: Settings) -> Celery:
    app = create_celery(settings)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=not settings.broker.startswith("filesystem://"),
        worker_hijack_root_logger=False,
        imports=("workers.tasks",),
    )
    app.fudlr_settings = settings
    return app
