"""`/v1/usage`: what the tenant stores and runs, against its quotas."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.auth.service import StoreDep, TenantDep
from service.context import ContextDep, SessionDep
from service.usage.schemas import UsageOut
from service.usage.service import usage

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("", response_model=UsageOut)
def get_usage(
    context: ContextDep, session: SessionDep, tenant: TenantDep, store: StoreDep
) -> dict[str, Any]:
    """Bytes stored and unfinished jobs, with the quotas they count against."""
    return usage(session, store, tenant, context.settings)
