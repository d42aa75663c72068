"""Sending work to the workers, and asking the broker how much is waiting.

The service owns the task names and the broker's configuration; the workers
(workers/app.py) register the tasks under these names and add what only a consumer needs.
"""

from __future__ import annotations

import logging

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.db import Leased, transaction, utcnow
from service.settings import Settings

log = logging.getLogger(__name__)
INDEX_TASK = "fudlr.index_version"
JOB_TASK = "fudlr.run_job"
TASKS = {"jobs": JOB_TASK, "versions": INDEX_TASK}


def create_celery(settings: Settings) -> Celery:
    """A Celery app on the configured broker and queue: what senders and workers share."""
    app = Celery("fudlr", broker=settings.broker, set_as_current=False)
    options: dict = {"visibility_timeout": settings.visibility_timeout_seconds}
    if settings.broker.startswith("filesystem://"):
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
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_routes={"fudlr.*": {"queue": settings.queue}},
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
    )
    return app


class TaskQueue:
    def __init__(self, celery: Celery, queue: str) -> None:
        self.celery, self.queue = celery, queue

    def send(self, sessions: sessionmaker[Session], model: type[Leased], subject_id: str) -> bool:
        """Send the task of a committed row; mark it sent. A failed send is left to the
        reaper's sweep (the row keeps `enqueued_at` empty), so callers never fail on it."""
        task = TASKS[model.__tablename__]
        try:
            self.celery.send_task(task, args=[subject_id], queue=self.queue)
        except Exception:
            log.warning("could not send %s %s; the reaper will retry", task, subject_id)
            return False
        with transaction(sessions) as session:
            session.execute(
                update(model).where(model.id == subject_id).values(enqueued_at=utcnow())
            )
        return True

    def depth(self) -> int:
        """Messages waiting in the queue (not counting those a worker holds)."""
        with self.celery.connection_for_read() as connection:
            channel = connection.default_channel
            return channel.queue_declare(queue=self.queue, passive=False).message_count

    def ping(self) -> None:
        """Raise unless the broker answers."""
        with self.celery.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
