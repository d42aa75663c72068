"""`/v1/base-models`: register a model directory by path, list, get."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from service.auth.service import TenantDep, owned
from service.base_models.models import RegisteredModel
from service.base_models.schemas import BaseModelCreate, BaseModelOut
from service.base_models.service import register_base_model
from service.context import ContextDep, SessionDep
from service.pagination import Page, paginate
from service.validation import Cursor, IdPath

router = APIRouter(prefix="/v1/base-models", tags=["base models"])


@router.post("", status_code=201, response_model=BaseModelOut)
def create_base_model(
    context: ContextDep, session: SessionDep, tenant: TenantDep, request: BaseModelCreate
) -> RegisteredModel:
    """Register a directory workers can read; its safetensors weights are hashed and pinned."""
    return register_base_model(session, context.settings, tenant, request)


@router.get("", response_model=Page[BaseModelOut])
def list_base_models(
    session: SessionDep,
    tenant: TenantDep,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict:
    query = select(RegisteredModel).where(RegisteredModel.tenant_id == tenant)
    rows, next_cursor = paginate(session, query, RegisteredModel, cursor, limit)
    return {"data": rows, "next_cursor": next_cursor}


@router.get("/{base_model_id}", response_model=BaseModelOut)
def get_base_model(
    session: SessionDep, tenant: TenantDep, base_model_id: IdPath
) -> RegisteredModel:
    return owned(session, RegisteredModel, base_model_id, tenant, "base model")
