"""Sending work to the workers, and asking the broker how much is waiting."""

from __future__ import annotations

import logging

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.db import Leased, transaction, utcnow
from workers.app import INDEX_TASK, JOB_TASK

log = logging.getLogger(__name__)
TASKS = {"jobs": JOB_TASK, "versions": INDEX_TASK}


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
