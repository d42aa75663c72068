"""Registering a recommender: every cross-check that needs no model, then version 1 and its
index task (sent once the rows are committed). Deleting one with everything it made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from fudlr.data.bundle import Bundle
from fudlr.data.schema import SPLITS
from fudlr.errors import InputError
from fudlr.recommender.recommend import RecommendConfig, check_decodable
from fudlr.states import TERMINAL
from service.auth.models import Tenant
from service.auth.service import owned
from service.base_models.models import RegisteredModel
from service.db import new_id
from service.files.models import File
from service.jobs.models import Event, Job
from service.problems import Problem, input_problem, not_found
from service.recommenders.fit import check_fit
from service.recommenders.models import Recommender, Version
from service.recommenders.schemas import RecommenderCreate
from service.settings import Settings
from service.storage import TenantStore
from service.usage.service import require_room


def create_recommender(
    session: Session,
    settings: Settings,
    store: TenantStore,
    tenant: str,
    request: RecommenderCreate,
) -> tuple[Recommender, Version]:
    base = owned(session, RegisteredModel, request.base_model_id, tenant, "base model")
    adapter = _file(session, tenant, request.adapter_file_id, "adapter", "adapter_file_id")
    files = {
        purpose: _file(session, tenant, file_id, purpose, f"data.{purpose}")
        for purpose, file_id in request.data.model_dump(exclude_none=True).items()
    }
    names = {
        f"{purpose}.jsonl": {"file": record.filename, "file_id": record.id}
        for purpose, record in files.items()
    }
    splits = tuple(split for split in SPLITS if split in files)
    with store.staging() as staging:
        folder = staging / "bundle"
        digest = store.assemble_bundle(
            {f"{purpose}.jsonl": record.sha256 for purpose, record in files.items()}, folder
        )
        try:
            bundle = Bundle.load(folder, splits=splits)
            bundle.item_completions()  # every completion wraps its target's title the same way
            check_decodable(bundle, RecommendConfig(decoding=request.decoding))
        except InputError as error:
            raise input_problem(error, names=names) from None
        adapter_digest = adapter.details["digest"]
        try:
            check_fit(Path(base.path), store.adapter(adapter_digest))
        except InputError as error:
            raise input_problem(error, "adapter_mismatch") from None

        recommender = Recommender(
            id=new_id("rec"),
            tenant_id=tenant,
            name=request.name,
            base_model_id=base.id,
            adapter_file_id=adapter.id,
            data={purpose: record.id for purpose, record in files.items()},
            bundle_digest=digest,
            index_options=request.index.model_dump(exclude_unset=True),
            decoding=request.decoding,
        )
        version = Version(
            id=new_id("ver"),
            tenant_id=tenant,
            recommender_id=recommender.id,
            number=1,
            digest=adapter_digest,
            bytes=store.blob(adapter_digest).stat().st_size,
            state=Version.PENDING,
        )
        # the checks read the files without the lock: they must still be there
        Tenant.lock(session, tenant)
        _require_files(session, {"adapter_file_id": adapter.id} | _data_fields(files))
        require_room(store, settings, 1)  # its index is yet to be built
        store.put(folder, store.bundle(digest))
        session.add_all([recommender, version])
        session.commit()
    return recommender, version


def _data_fields(files: dict[str, File]) -> dict[str, str]:
    return {f"data.{purpose}": record.id for purpose, record in files.items()}


def _require_files(session: Session, fields: dict[str, str]) -> None:
    """404 for a file deleted since it was read (call with the tenant's lock held)."""
    present = set(session.scalars(select(File.id).where(File.id.in_(fields.values()))))
    for field, file_id in fields.items():
        if file_id not in present:
            raise Problem(404, "not_found", f"file '{file_id}' not found", field=field)


def delete_recommender(
    session: Session, store: TenantStore, tenant: str, recommender_id: str
) -> None:
    """Forget the recommender with its versions, finished jobs and their events, and remove
    its indexes, measurements, bundle and repaired adapters (what no other row holds).
    409 while a job of it is unfinished or a version is still being indexed: a worker
    would write into what is being removed."""
    Tenant.lock(session, tenant)
    recommender = owned(session, Recommender, recommender_id, tenant, "recommender")
    jobs = session.scalars(select(Job).where(Job.recommender_id == recommender.id)).all()
    versions = session.scalars(
        select(Version).where(Version.recommender_id == recommender.id)
    ).all()
    busy = [f"job {job.id} is {job.state}" for job in jobs if job.state not in TERMINAL]
    busy += [f"version {v.number} is {v.state}" for v in versions if v.state == Version.RUNNING]
    if busy:
        raise Problem(
            409,
            "in_use",
            f"recommender '{recommender.id}' is in use ({'; '.join(busy)}): cancel its jobs "
            "or wait for them and for its indexes",
        )
    subjects = [job.id for job in jobs] + [version.id for version in versions]
    digests = {version.digest for version in versions}
    paths = [p for v in versions for p in (store.index(v.id), store.measurements(v.id))]
    session.execute(delete(Event).where(Event.subject_id.in_(subjects)))
    session.execute(delete(Version).where(Version.recommender_id == recommender.id))
    session.execute(delete(Job).where(Job.recommender_id == recommender.id))
    session.delete(recommender)
    session.flush()
    paths += [
        p for digest in digests - kept_digests(session, tenant) for p in store.content(digest)
    ]
    bundles = select(Recommender.id).where(
        Recommender.tenant_id == tenant, Recommender.bundle_digest == recommender.bundle_digest
    )
    if session.scalar(bundles.limit(1)) is None:
        paths.append(store.bundle(recommender.bundle_digest))
    with store.removing(recommender.id, paths):
        session.commit()
    for subject in subjects:
        store.clear_scratch(subject)  # what killed attempts left, if anything


def users_of(session: Session, tenant: str, file_id: str) -> list[str]:
    """The tenant's recommenders that were registered with the file."""
    return [
        recommender.id
        for recommender in session.scalars(
            select(Recommender).where(Recommender.tenant_id == tenant)
        )
        if file_id == recommender.adapter_file_id or file_id in recommender.data.values()
    ]


def kept_digests(session: Session, tenant: str) -> set[str]:
    """Digests the tenant's rows still hold in the store: its files' and its versions'."""
    files = session.scalars(select(File).where(File.tenant_id == tenant))
    versions = session.scalars(select(Version.digest).where(Version.tenant_id == tenant))
    return {record.digest for record in files} | set(versions)


def _file(session: Session, tenant: str, file_id: str, purpose: str, field: str) -> File:
    record = session.get(File, file_id)
    if record is None or record.tenant_id != tenant:
        raise Problem(404, "not_found", f"file '{file_id}' not found", field=field)
    if record.purpose != purpose:
        raise Problem(
            422,
            "wrong_purpose",
            f"file '{file_id}' was uploaded as '{record.purpose}', not '{purpose}'",
            field=field,
        )
    return record


def version_of(session: Session, recommender: Recommender, number: int) -> Version:
    version = session.scalar(
        select(Version).where(Version.recommender_id == recommender.id, Version.number == number)
    )
    if version is None:
        raise not_found("version", f"{recommender.id}/{number}")
    return version


def latest_number(session: Session, recommender_id: str) -> int:
    return session.scalar(
        select(func.max(Version.number)).where(Version.recommender_id == recommender_id)
    )


def recommender_out(session: Session, recommender: Recommender) -> dict[str, Any]:
    first = version_of(session, recommender, 1)
    return {
        "id": recommender.id,
        "name": recommender.name,
        "base_model_id": recommender.base_model_id,
        "adapter_file_id": recommender.adapter_file_id,
        "data": recommender.data,
        "index": recommender.index_options,
        "decoding": recommender.decoding,
        "state": first.state,
        "stage": first.stage,
        "progress": first.progress,
        "error": first.error,
        "latest_version": latest_number(session, recommender.id),
        "created_at": recommender.created_at,
    }


def version_out(version: Version) -> dict[str, Any]:
    return {
        "recommender_id": version.recommender_id,
        "number": version.number,
        "parent": version.parent_number,
        "job_id": version.job_id,
        "digest": version.digest,
        "bytes": version.bytes,
        "state": version.state,
        "stage": version.stage,
        "progress": version.progress,
        "error": version.error,
        "created_at": version.created_at,
        "ready_at": version.finished_at,
    }
