"""`/v1/recommenders`: register, list, get, delete; versions with lineage; adapter downloads."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse
from sqlalchemy import select
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from service.auth.service import StoreDep, TenantDep, owned
from service.context import ContextDep, SessionDep
from service.pagination import Page, paginate
from service.problems import MEDIA_TYPE, Problem, ProblemOut
from service.recommenders.models import Recommender, Version
from service.recommenders.schemas import RecommenderCreate, RecommenderOut, VersionOut
from service.recommenders.service import (
    create_recommender,
    delete_recommender,
    recommender_out,
    version_of,
    version_out,
)
from service.validation import INT32_MAX, Cursor, IdPath, VersionNumber

router = APIRouter(prefix="/v1/recommenders", tags=["recommenders"])


@router.post("", status_code=201, response_model=RecommenderOut)
def register_recommender(
    context: ContextDep,
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    request: RecommenderCreate,
    response: Response,
) -> dict:
    """Cross-check the adapter, the base model and the data, then build the index (state
    `indexing`, then `ready` or `failed`)."""
    recommender, version = create_recommender(session, context.settings, store, tenant, request)
    context.queue.send(context.sessions, Version, version.id)
    response.headers["Location"] = f"/v1/recommenders/{recommender.id}"
    return recommender_out(session, recommender)


@router.get("", response_model=Page[RecommenderOut])
def list_recommenders(
    session: SessionDep,
    tenant: TenantDep,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict:
    query = select(Recommender).where(Recommender.tenant_id == tenant)
    rows, next_cursor = paginate(session, query, Recommender, cursor, limit)
    return {"data": [recommender_out(session, row) for row in rows], "next_cursor": next_cursor}


@router.get("/{recommender_id}", response_model=RecommenderOut)
def get_recommender(session: SessionDep, tenant: TenantDep, recommender_id: IdPath) -> dict:
    recommender = owned(session, Recommender, recommender_id, tenant, "recommender")
    return recommender_out(session, recommender)


@router.delete("/{recommender_id}", status_code=204, response_class=Response)
def remove_recommender(
    session: SessionDep, tenant: TenantDep, store: StoreDep, recommender_id: IdPath
) -> Response:
    """Delete the recommender with its versions, indexes and finished jobs (409 `in_use`
    while a job of it is unfinished or a version is being indexed); its files stay."""
    delete_recommender(session, store, tenant, recommender_id)
    return Response(status_code=204)


@router.get("/{recommender_id}/versions", response_model=Page[VersionOut])
def list_versions(
    session: SessionDep,
    tenant: TenantDep,
    recommender_id: IdPath,
    after: Annotated[
        int, Query(ge=0, le=INT32_MAX, description="list versions after this number")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict:
    """Oldest first: each version names its parent and the job that made it."""
    owned(session, Recommender, recommender_id, tenant, "recommender")
    rows = session.scalars(
        select(Version)
        .where(Version.recommender_id == recommender_id, Version.number > after)
        .order_by(Version.number)
        .limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "data": [version_out(row) for row in rows],
        "next_cursor": str(rows[-1].number) if more else None,
    }


@router.get("/{recommender_id}/versions/{number}", response_model=VersionOut)
def get_version(
    session: SessionDep, tenant: TenantDep, recommender_id: IdPath, number: VersionNumber
) -> dict:
    recommender = owned(session, Recommender, recommender_id, tenant, "recommender")
    return version_out(version_of(session, recommender, number))


@router.get(
    "/{recommender_id}/versions/{number}/adapter",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "the PEFT directory"},
        206: {"content": {"application/gzip": {}}, "description": "the requested byte ranges"},
        304: {"description": "If-None-Match matched the digest"},
        416: {
            "description": "the Range header is malformed or outside the file",
            "content": {MEDIA_TYPE: {"schema": ProblemOut.model_json_schema()}},
        },
    },
)
def download_adapter(
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    recommender_id: IdPath,
    number: VersionNumber,
    if_none_match: Annotated[str | None, Header()] = None,
    range_: Annotated[str | None, Header(alias="range", include_in_schema=False)] = None,
    if_range: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """The version's PEFT directory as a `.tar.gz`; the strong ETag is its sha256."""
    recommender = owned(session, Recommender, recommender_id, tenant, "recommender")
    version = version_of(session, recommender, number)
    etag = f'"{version.digest}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if if_none_match is not None:
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        if "*" in tags or etag in tags:
            return Response(status_code=304, headers=headers)
    blob = store.blob(version.digest)
    if range_ is not None and if_range in (None, etag):
        _check_range(range_, blob.stat().st_size)
    return FileResponse(
        blob,
        media_type="application/gzip",
        filename=f"{recommender.name}-v{number}.tar.gz",
        headers=headers,
    )


_RANGES = re.compile(r"^bytes=\s*\d{0,18}-\d{0,18}(\s*,\s*\d{0,18}-\d{0,18}){0,99}\s*$")


def _check_range(header: str, size: int) -> None:
    """A Range the file response would refuse, refused first as a problem (it would answer
    plain text, and fail outright on numbers too long to convert)."""
    unsatisfiable = Problem(
        416,
        "range_not_satisfiable",
        f"the Range header is malformed or outside the file's {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
    if not _RANGES.match(header):
        raise unsatisfiable
    try:
        FileResponse._parse_range_header(header, size)
    except (MalformedRangeHeader, RangeNotSatisfiable):
        raise unsatisfiable from None
