"""Submitting, cancelling and reading debias jobs.

Everything a job can be refused for without a model is refused here, with a problem
the client can act on: an unknown or unready version, a bias the data cannot support.
A job row is committed before its task is sent (the router sends it), so a worker never
receives a job it cannot find.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fudlr.data.bundle import Bundle
from fudlr.errors import InputError
from fudlr.influence.manifest import MANIFEST, stored_projection
from fudlr.recommender.recommend import Decoding, check_decodable
from fudlr.repair.config import (
    UnmeasurableBias,
    check_projection,
    screened,
    unmeasurable_in_data,
)
from fudlr.states import TERMINAL, JobState, VersionState
from service.auth.models import Tenant
from service.auth.service import owned
from service.db import new_id, utcnow
from service.jobs.models import Event, Job, add_event
from service.jobs.schemas import JobCreate, JobSpec
from service.problems import Problem, not_found
from service.recommenders.models import Recommender, Version
from service.recommenders.service import latest_number, version_of
from service.settings import Settings
from service.storage import TenantStore
from service.usage.service import require_job_slot, require_room


def create_job(
    session: Session,
    settings: Settings,
    store: TenantStore,
    tenant: str,
    request: JobCreate,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """(job, created): an Idempotency-Key seen before with the same body returns that job."""
    body = request.model_dump(mode="json")
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    if idempotency_key is not None:
        existing = _by_key(session, tenant, idempotency_key, digest)
        if existing is not None:
            return existing, False

    recommender = owned(session, Recommender, request.recommender_id, tenant, "recommender")
    number = request.version or latest_number(session, recommender.id)
    version = version_of(session, recommender, number)
    if version.state != VersionState.READY:
        reason = version.error["detail"] if version.error else "its training-set index is building"
        raise Problem(
            409,
            "version_not_ready",
            f"version {number} of '{recommender.id}' is {version.state}: {reason}",
            field="version",
        )
    spec = JobSpec.model_validate(request.model_dump(include={"biases", "budget", "options"}))
    if spec.options.decoding is None:
        spec.options.decoding = Decoding(recommender.decoding)
    _check_against_data(store, recommender, spec)
    _check_against_index(store, version, spec)

    Tenant.lock(session, tenant)  # the quotas; and the recommender must still be there
    if session.scalar(select(Recommender.id).where(Recommender.id == recommender.id)) is None:
        raise not_found("recommender", recommender.id)
    require_job_slot(session, tenant, settings)
    require_room(store, settings, 1)  # its version and that version's index are yet to come
    job = Job(
        id=new_id("job"),
        tenant_id=tenant,
        recommender_id=recommender.id,
        version=number,
        state=Job.PENDING,
        spec=spec.model_dump(mode="json"),
        idempotency_key=idempotency_key,
        request_hash=digest,
    )
    session.add(job)
    add_event(session, job.id, "state", f"queued on version {number}")
    try:
        session.commit()
    except IntegrityError:  # the same key, submitted concurrently: the other one won
        session.rollback()
        existing = _by_key(session, tenant, idempotency_key or "", digest)
        if existing is None:
            raise
        return existing, False
    return job, True


def _by_key(session: Session, tenant: str, key: str, digest: str) -> Job | None:
    job = session.scalar(select(Job).where(Job.tenant_id == tenant, Job.idempotency_key == key))
    if job is not None and job.request_hash != digest:
        raise Problem(
            422,
            "idempotency_conflict",
            "this Idempotency-Key was used for a different request body",
            job_id=job.id,
        )
    return job


def _check_against_index(store: TenantStore, version: Version, spec: JobSpec) -> None:
    """A job that expects another projection than its version's index stores is refused
    now, not by the worker after it queued."""
    path = store.index(version.id) / MANIFEST
    if spec.options.projection is None or not path.is_file():
        return  # the worker checks the index it loads
    manifest = json.loads(path.read_text())
    try:
        check_projection(stored_projection(manifest), spec.options.projection)
    except InputError as error:
        raise Problem(422, "index_mismatch", error.reason, field="options.projection") from None


def _check_against_data(store: TenantStore, recommender: Recommender, spec: JobSpec) -> None:
    """Biases against the groups of the registered data, and whether the job's guard users
    can measure them (a group with none of them, an item group absent from their
    histories); accuracy's K against the catalog; the test split where asked for."""
    bundle = Bundle.load(store.bundle(recommender.bundle_digest), splits=("valid",))
    groups = {}
    for position, bias in enumerate(spec.biases):
        try:
            groups[bias.spec().label] = bias.spec().groups(bundle, "valid")
        except InputError as error:
            raise Problem(422, "invalid_bias", error.reason, field=f"biases.{position}") from None
    config = spec.to_config()
    try:
        screened(config, unmeasurable_in_data(bundle, config, groups))
    except UnmeasurableBias as error:
        field = f"biases.{error.position}"
        raise Problem(422, "unmeasurable_bias", error.reason, field=field) from None
    if config.accuracy_k > len(bundle.items):
        raise Problem(
            422,
            "validation_error",
            f"accuracy_k={config.accuracy_k} is larger than the catalog ({len(bundle.items)})",
            field="budget.accuracy_k",
        )
    try:
        check_decodable(bundle, config.recommend)
    except InputError as error:
        raise Problem(422, "not_decodable", error.reason, field="options.decoding") from None
    if "test" not in recommender.data:
        if spec.options.test_users:
            raise Problem(
                422,
                "validation_error",
                "the recommender was registered without a test split",
                field="options.test_users",
            )
        spec.options.test_users = 0


def cancel_job(session: Session, job: Job) -> Job:
    """Queued: cancelled at once. Running: `cancelling` until the worker stops at its next
    batch. Finished: 409. Each step is a conditional update, so a race with the worker
    (or another cancel) is decided by the database."""
    for _ in range(3):
        session.refresh(job)
        if job.state in TERMINAL:
            raise Problem(409, "job_finished", f"job '{job.id}' already {job.state}")
        if job.state == JobState.CANCELLING:
            return job
        at_once = job.state == Job.PENDING
        values: dict[str, Any] = {"state": JobState.CANCELLED if at_once else JobState.CANCELLING}
        if at_once:
            values["finished_at"] = utcnow()
        changed = session.execute(
            update(Job).where(Job.id == job.id, Job.state == job.state).values(**values)
        ).rowcount
        if changed == 1:
            message = "cancelled before it started" if at_once else "cancel requested"
            add_event(session, job.id, "state", message)
            session.commit()
            session.refresh(job)
            return job
        session.rollback()
    raise Problem(409, "job_finished", f"job '{job.id}' changed state while cancelling; retry")


def events_after(session: Session, job: Job, after: int, limit: int) -> list[Event]:
    return list(
        session.scalars(
            select(Event)
            .where(Event.subject_id == job.id, Event.id > after)
            .order_by(Event.id)
            .limit(limit)
        )
    )


def job_out(job: Job) -> dict[str, Any]:
    spec = JobSpec.model_validate(job.spec)
    return {
        "id": job.id,
        "recommender_id": job.recommender_id,
        "version": job.version,
        "state": job.state,
        "stage": job.stage,
        "progress": job.progress,
        "attempts": job.attempts,
        "biases": [bias.spec().label for bias in spec.biases],
        "spec": spec,
        "metrics": job.metrics or {},
        "result_version": job.result_version,
        "error": job.error,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "updated_at": job.updated_at,
    }
