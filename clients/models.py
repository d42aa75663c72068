"""What the SDK reads back from the API, as its own models: a client needs none of the
server's code (torch, SQLAlchemy, FastAPI) to be typed.

Each mirrors the response of the same name in service/*/schemas.py, field for field
(tests/unit/test_layers.py holds them equal). Values the server constrains arrive here as
it sent them: states and kinds as strings, a job's specification as JSON. Fields a newer
server adds are ignored, so an older client keeps working.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class JobError(BaseModel):
    """Why a job or an index failed: a stable `code`, and where in the input if known."""

    code: str
    detail: str
    file: str | None = None
    line: int | None = None
    field: str | None = None


class JobMetrics(BaseModel):
    """Validation-split measurements before and after, the influence model's prediction,
    the test split's when measured, the published step's accuracy check (`resolved`: false
    when the guard users' hits could not resolve the budget) and the biases left out as
    unmeasurable."""

    before: dict[str, Any] | None = None
    predicted: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    dropped_biases: list[dict[str, str]] | None = None


class JobOut(BaseModel):
    """A debias job; `state`: queued, running, succeeded, failed, cancelling, cancelled."""

    id: str
    object: str = "job"
    recommender_id: str
    version: int
    state: str
    stage: str | None
    progress: float | None
    attempts: int
    biases: list[str]
    spec: dict[str, Any]
    metrics: JobMetrics
    result_version: int | None
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class EventOut(BaseModel):
    """A milestone of a job or an index; `kind`: state, stage or message."""

    id: int
    created_at: datetime
    kind: str
    message: str
    stage: str | None
    progress: float | None


class FileOut(BaseModel):
    id: str
    object: str = "file"
    purpose: str
    filename: str
    bytes: int
    sha256: str
    details: dict[str, Any]
    created_at: datetime


class BaseModelOut(BaseModel):
    id: str
    object: str = "base_model"
    name: str
    path: str
    digest: str
    details: dict[str, Any]
    created_at: datetime


class RecommenderOut(BaseModel):
    """A registered recommender; `state` is its first version's index: indexing, ready or
    failed."""

    id: str
    object: str = "recommender"
    name: str
    base_model_id: str
    adapter_file_id: str
    data: dict[str, str]
    index: dict[str, Any]
    decoding: str
    state: str
    stage: str | None
    progress: float | None
    error: JobError | None
    latest_version: int
    created_at: datetime


class VersionOut(BaseModel):
    """One adapter version of a recommender; `state` is its index's."""

    object: str = "recommender.version"
    recommender_id: str
    number: int
    parent: int | None
    job_id: str | None
    digest: str
    bytes: int
    state: str
    stage: str | None
    progress: float | None
    error: JobError | None
    created_at: datetime
    ready_at: datetime | None


class UsageOut(BaseModel):
    """Bytes stored and unfinished jobs, against the tenant's quotas."""

    object: str = "usage"
    bytes_stored: int
    max_bytes: int
    active_jobs: int
    max_jobs: int
