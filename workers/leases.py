"""Leases: how a worker owns a row while it works, and how the world learns it is gone.

A claim is one conditional UPDATE (state PENDING, no owner) that only one worker can
win, so a duplicate delivery of the same message finds nothing to do. The owner renews
its lease from a heartbeat thread; every later write is conditional on still owning the
row, so a worker that lost its lease (the reaper gave the work to another) can no
longer publish anything. Cancellation is read from the row, at most once per poll.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from fudlr.control import Control
from fudlr.states import JobState
from service.db import Leased, transaction, utcnow
from service.jobs.models import add_event
from service.settings import Settings

log = logging.getLogger(__name__)
_PROGRESS_EVERY = 0.5  # seconds between progress writes within a stage


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """A claimed row: renew, report progress and events, poll cancellation, finish."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        model: type[Leased],
        subject_id: str,
        owner: str,
        settings: Settings,
        attempt: int,
    ) -> None:
        self.sessions, self.model, self.id, self.owner = sessions, model, subject_id, owner
        self.settings, self.attempt = settings, attempt
        self.lost = False
        self._cancel_requested = False
        self._polled = 0.0
        self._stage: str | None = None
        self._written = 0.0
        self._stop = threading.Event()

    @classmethod
    def claim(
        cls,
        sessions: sessionmaker[Session],
        model: type[Leased],
        subject_id: str,
        settings: Settings,
    ) -> Lease | None:
        """Take the row if it is waiting and nobody holds it; None otherwise."""
        owner, now = worker_name(), utcnow()
        with transaction(sessions) as session:
            claimed = session.execute(
                update(model)
                .where(
                    model.id == subject_id,
                    model.state == model.PENDING,
                    model.lease_owner.is_(None),
                )
                .values(
                    state=model.RUNNING,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
                    attempts=model.attempts + 1,
                    started_at=func.coalesce(model.started_at, now),
                    stage=None,
                    progress=None,
                )
            ).rowcount
            if claimed != 1:
                return None
            attempt = session.scalar(select(model.attempts).where(model.id == subject_id)) or 1
            add_event(
                session,
                subject_id,
                "state",
                f"{model.RUNNING} on {owner} (attempt {attempt} of {settings.max_attempts})",
            )
        return cls(sessions, model, subject_id, owner, settings, attempt)

    def _owned(self) -> Any:
        return (self.model.id == self.id) & (self.model.lease_owner == self.owner)

    def renew(self) -> None:
        """Extend the lease; a lease found taken marks this worker as having lost the row."""
        expires = utcnow() + timedelta(seconds=self.settings.lease_seconds)
        with transaction(self.sessions) as session:
            renewed = session.execute(
                update(self.model).where(self._owned()).values(lease_expires_at=expires)
            ).rowcount
        if renewed != 1 and not self.lost:
            log.warning("lease on %s lost; stopping at the next batch", self.id)
            self.lost = True

    @contextmanager
    def heartbeat(self) -> Iterator[Lease]:
        """Renew the lease in a thread for as long as the block runs (model loading, long
        evaluations: stretches where the work itself reports nothing)."""

        def beat() -> None:
            while not self._stop.wait(self.settings.heartbeat):
                try:
                    self.renew()
                except Exception:  # a database hiccup: try again at the next beat
                    log.exception("heartbeat of %s failed", self.id)

        thread = threading.Thread(target=beat, name=f"heartbeat-{self.id}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    def cancelled(self) -> bool:
        """True once cancellation was requested or the lease was lost; reads the row at most
        once per `cancel_poll_seconds`, so calling it every batch costs nothing."""
        now = time.monotonic()
        if not (self.lost or self._cancel_requested) and now - self._polled >= (
            self.settings.cancel_poll_seconds
        ):
            self._polled = now
            with self.sessions() as session:
                row = session.execute(
                    select(self.model.state, self.model.lease_owner).where(self.model.id == self.id)
                ).one()
            self._cancel_requested = row.state == JobState.CANCELLING
            self.lost = self.lost or row.lease_owner != self.owner
        return self.lost or self._cancel_requested

    def progress(self, stage: str, done: int, total: int) -> None:
        """Stage and fraction on the row (a new stage is also an event), throttled."""
        now = time.monotonic()
        new_stage = stage != self._stage
        if not (new_stage or done >= total or now - self._written >= _PROGRESS_EVERY):
            return
        self._stage, self._written = stage, now
        fraction = min(done / total, 1.0) if total else None
        with transaction(self.sessions) as session:
            session.execute(
                update(self.model).where(self._owned()).values(stage=stage, progress=fraction)
            )
            if new_stage:
                add_event(session, self.id, "stage", stage, stage=stage, progress=fraction)

    def event(self, message: str) -> None:
        with transaction(self.sessions) as session:
            add_event(session, self.id, "message", message, stage=self._stage)

    def control(self) -> Control:
        return Control(progress=self.progress, event=self.event, cancelled=self.cancelled)

    def finish(
        self,
        session: Session,
        state: str,
        message: str,
        only_from: tuple[str, ...] | None = None,
        **values: Any,
    ) -> bool:
        """End the work in `session`'s transaction if this worker still owns the row (and,
        with `only_from`, the row is in one of those states)."""
        condition = self._owned()
        if only_from is not None:
            condition = condition & self.model.state.in_(only_from)
        finished = session.execute(
            update(self.model)
            .where(condition)
            .values(
                state=state,
                lease_owner=None,
                lease_expires_at=None,
                finished_at=utcnow(),
                **values,
            )
        ).rowcount
        if finished == 1:
            add_event(session, self.id, "state", message)
        return finished == 1
