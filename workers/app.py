"""The Celery app, configured from Settings: the database row decides, the broker delivers.

`acks_late` + prefetch 1: a task's message is acknowledged after it ran, one at a time
per worker. Redis redelivers an unacknowledged message only after the visibility
timeout (longer than any job); a lost worker is found sooner by its expired lease.
Nothing here imports torch: CUDA is initialised inside the tasks only.
"""

from __future__ import annotations

from celery import Celery

from service.settings import Settings

INDEX_TASK = "fudlr.index_version"
JOB_TASK = "fudlr.run_job"


def create_celery(settings: Settings) -> Celery:
    app = Celery("fudlr", broker=settings.broker, set_as_current=False)
    options: dict = {"visibility_timeout": settings.visibility_timeout_seconds}
    filesystem = settings.broker.startswith("filesystem://")
    if filesystem:
        folder = settings.broker_folder
        for sub in ("processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        options.update(
            data_folder_in=str(folder),
            data_folder_out=str(folder),
            processed_folder=str(folder / "processed"),
            control_folder=str(folder / "control"),
            store_processed=False,
        )
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_routes={"fudlr.*": {"queue": settings.queue}},
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        worker_enable_remote_control=not filesystem,
        worker_hijack_root_logger=False,
        imports=("workers.tasks",),
    )
    app.fudlr_settings = settings
    return app
