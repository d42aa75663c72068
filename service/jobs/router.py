"""`/v1/jobs`: submit (202 + Location, Idempotency-Key), list, get, events, cancel, report."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy import select

from fudlr.states import JobState
from service.auth.service import StoreDep, TenantDep, owned
from service.context import ContextDep, SessionDep
from service.jobs.models import Job
from service.jobs.schemas import EventPage, JobCreate, JobOut
from service.jobs.service import cancel_job, create_job, events_after, job_out
from service.pagination import Page, paginate
from service.problems import Problem
from service.validation import INT64_MAX, Cursor, IdPath, IdQuery, Text

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobOut)
def submit_job(
    context: ContextDep,
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    request: JobCreate,
    response: Response,
    idempotency_key: Annotated[
        Text | None,
        Header(max_length=255, description="same key + same body: the same job, not a new one"),
    ] = None,
) -> dict:
    """Queue a debias job on a ready version; poll `Location` for its state."""
    job, created = create_job(session, context.settings, store, tenant, request, idempotency_key)
    if created:
        context.queue.send(context.sessions, Job, job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


@router.get("", response_model=Page[JobOut])
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    recommender_id: IdQuery = None,
    state: JobState | None = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict:
    query = select(Job).where(Job.tenant_id == tenant)
    if recommender_id is not None:
        query = query.where(Job.recommender_id == recommender_id)
    if state is not None:
        query = query.where(Job.state == state)
    rows, next_cursor = paginate(session, query, Job, cursor, limit)
    return {"data": [job_out(row) for row in rows], "next_cursor": next_cursor}


@router.get("/{job_id}", response_model=JobOut)
def get_job(session: SessionDep, tenant: TenantDep, job_id: IdPath) -> dict:
    return job_out(owned(session, Job, job_id, tenant, "job"))


@router.get("/{job_id}/events", response_model=EventPage)
def list_events(
    session: SessionDep,
    tenant: TenantDep,
    job_id: IdPath,
    after: Annotated[
        int, Query(ge=0, le=INT64_MAX, description="only events with a larger id")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    """Milestones, state changes and stage changes, oldest first."""
    job = owned(session, Job, job_id, tenant, "job")
    events = events_after(session, job, after, limit)
    return {"data": events, "last_id": events[-1].id if events else None}


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel(session: SessionDep, tenant: TenantDep, job_id: IdPath) -> dict:
    """Queued jobs end at once; running ones stop at their next batch (`cancelling`)."""
    return job_out(cancel_job(session, owned(session, Job, job_id, tenant, "job")))


@router.get("/{job_id}/report", response_model=dict[str, Any])
def get_report(session: SessionDep, tenant: TenantDep, job_id: IdPath) -> dict[str, Any]:
    """Selected training samples with their weights and scores, the guard's attempts,
    metrics before and after; also for a job whose repair the guard rejected (its
    `status` is then "rejected"), so the rejection can be diagnosed."""
    job = owned(session, Job, job_id, tenant, "job")
    if job.report is None:
        raise Problem(
            409,
            "report_unavailable",
            f"job '{job.id}' is {job.state}; only succeeded jobs and jobs whose repair the "
            "guard rejected have a report",
        )
    return job.report
