"""Registering a recommender: every cross-check that needs no model, then version 1 and its
index task (sent once the rows are committed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fudlr.data.bundle import Bundle
from fudlr.data.schema import SPLITS
from fudlr.errors import InputError
from fudlr.recommender.recommend import RecommendConfig, check_decodable
from service.auth.service import owned
from service.base_models.models import RegisteredModel
from service.db import new_id
from service.files.models import File
from service.problems import Problem, input_problem, not_found
from service.recommenders.fit import check_fit
from service.recommenders.models import Recommender, Version
from service.recommenders.schemas import RecommenderCreate
from service.storage import TenantStore


def create_recommender(
    session: Session, store: TenantStore, tenant: str, request: RecommenderCreate
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
        store.put(folder, store.bundle(digest))

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
    session.add_all([recommender, version])
    session.commit()
    return recommender, version


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
