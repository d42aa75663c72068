"""Per-tenant quotas: bytes stored and unfinished jobs. Checked under the tenant's lock
(`Tenant.lock`), so concurrent requests cannot both take the last of a quota."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fudlr.states import TERMINAL
from service.jobs.models import Job
from service.problems import Problem
from service.settings import Settings
from service.storage import TenantStore


def active_jobs(session: Session, tenant: str) -> int:
    """Jobs that hold (or wait for) a worker: every state but the terminal ones."""
    return session.scalar(
        select(func.count()).where(Job.tenant_id == tenant, Job.state.not_in(TERMINAL))
    )


def require_room(store: TenantStore, settings: Settings, needed: int) -> None:
    """413 unless `needed` more bytes fit the tenant's byte quota. Work whose size is not
    known yet (an index, a repaired version) asks for one byte: it starts only while the
    tenant is below its quota."""
    stored, limit = store.bytes_stored(), settings.max_tenant_bytes
    if stored + needed > limit:
        raise Problem(
            413,
            "quota_exceeded",
            f"the tenant stores {stored} of its {limit} bytes and this needs {needed} more; "
            "delete files or recommenders to make room",
        )


def require_job_slot(session: Session, tenant: str, settings: Settings) -> None:
    """429 (Retry-After) while the tenant has its quota of unfinished jobs."""
    active, limit = active_jobs(session, tenant), settings.max_tenant_jobs
    if active >= limit:
        raise Problem(
            429,
            "quota_exceeded",
            f"the tenant has {active} unfinished jobs, its quota is {limit}; retry once one "
            "has finished",
            headers={"Retry-After": str(settings.quota_retry_after_seconds)},
        )


def usage(session: Session, store: TenantStore, tenant: str, settings: Settings) -> dict[str, Any]:
    return {
        "bytes_stored": store.bytes_stored(),
        "max_bytes": settings.max_tenant_bytes,
        "active_jobs": active_jobs(session, tenant),
        "max_jobs": settings.max_tenant_jobs,
    }
