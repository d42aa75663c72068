"""The reaper: takes back work whose worker stopped renewing its lease, and resends lost sends.

Run periodically by the API process (any number of reapers may run: every change is a
conditional UPDATE on the lease it saw). An expired lease is requeued until the row has
used `max_attempts` claims, then the work fails with that reason; a job whose
cancellation was requested ends `cancelled` instead. Work that ends here leaves no scratch
behind: the reaper removes what its lost attempts wrote (a requeued attempt removes its
predecessors' itself). It also settles deletions a crash interrupted (`settle_trash`).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from fudlr.states import JobState
from service.auth.models import Tenant
from service.db import Leased, transaction, utcnow
from service.files.models import File
from service.jobs.models import Job, add_event
from service.queue import TaskQueue
from service.recommenders.models import Recommender, Version
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger(__name__)
MODELS: tuple[type[Leased], ...] = (Job, Version)
_SEND_GRACE = timedelta(seconds=10)  # a send the API is about to make is not lost yet


def reap(sessions: sessionmaker[Session], settings: Settings, queue: TaskQueue) -> list[str]:
    """One pass; returns the ids it requeued or resent (for logs and tests)."""
    resend: list[tuple[type[Leased], str]] = []
    for model in MODELS:
        resend += [(model, i) for i in _expire(sessions, model, settings)]
        resend += [(model, i) for i in _unsent(sessions, model)]
    unique = list(dict.fromkeys(resend))  # a requeued row is also unsent: send it once
    for model, subject_id in unique:
        queue.send(sessions, model, subject_id)
    settle_trash(sessions, Storage(settings.artifacts))
    return [subject_id for _, subject_id in unique]


def settle_trash(sessions: sessionmaker[Session], storage: Storage) -> list[str]:
    """Finish or undo deletions a crash interrupted (run at startup and by every pass):
    under the tenant's lock, a file or recommender still in the database gets its files
    back from the trash, one that is gone loses them. Returns the subjects settled."""
    settled = []
    for tenant in storage.tenants_with_trash():
        with transaction(sessions) as session:
            Tenant.lock(session, tenant)

            def exists(subject: str, session: Session = session) -> bool:
                return any(session.get(model, subject) for model in (File, Recommender))

            settled += storage.tenant(tenant).recover_trash(exists)
    if settled:
        log.info("settled interrupted deletions of %s", ", ".join(settled))
    return settled


def _expire(sessions: sessionmaker[Session], model: type[Leased], settings: Settings) -> list[str]:
    now, max_attempts = utcnow(), settings.max_attempts
    with sessions() as session:
        expired = session.execute(
            select(model.id, model.tenant_id, model.state, model.lease_owner, model.attempts).where(
                model.lease_owner.is_not(None), model.lease_expires_at < now
            )
        ).all()
    requeued = []
    for row in expired:
        if row.state == JobState.CANCELLING:
            values = {"state": JobState.CANCELLED, "finished_at": now}
            message = "cancelled (the worker stopped before it could acknowledge)"
        elif row.attempts >= max_attempts:
            reason = f"the worker was lost {row.attempts} times (lease expired); giving up"
            values = {
                "state": model.FAILED,
                "finished_at": now,
                "error": {"code": "worker_lost", "detail": reason},
            }
            message = f"failed: {reason}"
        else:
            values = {"state": model.PENDING, "enqueued_at": None, "stage": None, "progress": None}
            message = (
                f"the worker {row.lease_owner} was lost (lease expired); requeued "
                f"(attempt {row.attempts} of {max_attempts} used)"
            )
        with transaction(sessions) as session:
            taken = session.execute(
                update(model)
                .where(
                    model.id == row.id,
                    model.lease_owner == row.lease_owner,
                    model.lease_expires_at < now,
                )
                .values(lease_owner=None, lease_expires_at=None, **values)
            ).rowcount
            if taken != 1:
                continue  # renewed meanwhile, or another reaper got there first
            add_event(session, row.id, "state", message)
        log.warning("%s %s: %s", model.__tablename__, row.id, message)
        if values["state"] == model.PENDING:
            requeued.append(row.id)
        else:
            Storage(settings.artifacts).tenant(row.tenant_id).clear_scratch(row.id)
    return requeued


def _unsent(sessions: sessionmaker[Session], model: type[Leased]) -> list[str]:
    """Waiting rows whose task message was never sent (broker down at submit time)."""
    with sessions() as session:
        return list(
            session.scalars(
                select(model.id).where(
                    model.state == model.PENDING,
                    model.lease_owner.is_(None),
                    model.enqueued_at.is_(None),
                    model.created_at < utcnow() - _SEND_GRACE,
                )
            )
        )
