"""`/v1/files`: upload (multipart: `file` + `purpose`), list, get, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Response, UploadFile
from fastapi import File as FileField
from sqlalchemy import select

from service.auth.service import StoreDep, TenantDep, owned
from service.context import ContextDep, SessionDep
from service.files.models import File
from service.files.schemas import FileOut, Purpose
from service.files.service import clean_filename, create_file, delete_file
from service.pagination import Page, paginate
from service.validation import Cursor, IdPath

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", status_code=201, response_model=FileOut)
def upload_file(
    context: ContextDep,
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    file: Annotated[UploadFile, FileField(description="the file (adapters: .tar.gz or .zip)")],
    purpose: Annotated[Purpose, Form()],
) -> File:
    """Validate and store a file; data files are checked row by row, adapters entry by entry."""
    return create_file(
        session,
        context.settings,
        store,
        tenant,
        purpose,
        clean_filename(file.filename),
        file.file,
    )


@router.get("", response_model=Page[FileOut])
def list_files(
    session: SessionDep,
    tenant: TenantDep,
    purpose: Purpose | None = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict:
    query = select(File).where(File.tenant_id == tenant)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    rows, next_cursor = paginate(session, query, File, cursor, limit)
    return {"data": rows, "next_cursor": next_cursor}


@router.get("/{file_id}", response_model=FileOut)
def get_file(session: SessionDep, tenant: TenantDep, file_id: IdPath) -> File:
    return owned(session, File, file_id, tenant, "file")


@router.delete("/{file_id}", status_code=204, response_class=Response)
def remove_file(
    session: SessionDep, tenant: TenantDep, store: StoreDep, file_id: IdPath
) -> Response:
    """Delete the file and its stored bytes (409 `in_use` while a recommender uses it)."""
    delete_file(session, store, tenant, file_id)
    return Response(status_code=204)
