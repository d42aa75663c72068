"""Recommenders and their versions as the API takes and shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from fudlr.influence.projection import Projection
from fudlr.recommender.recommend import Decoding
from fudlr.states import VersionState
from service.jobs.schemas import JobError
from service.validation import INT32_MAX, Id, RequestModel, Text


class DataFiles(RequestModel):
    """File ids of the bundle, each uploaded with the matching purpose."""

    train: Id
    valid: Id
    items: Id
    users: Id
    test: Id | None = None


class IndexOptions(RequestModel):
    """How the training-set index is built (unset: the method's defaults). kind: ekfac or
    kfac; curvature_samples: fit on a subset (null: all samples); candidates: index a
    fixed-seed subset of this many training samples, the only ones a job may select (null:
    all); gradient_cache: keep every
    sample's gradient so that jobs need no pass over the training set; projection: what
    the cache keeps of each gradient (eigenbasis: `projection_dim` coordinates of the
    curvature's eigenbasis; dense: every LoRA weight)."""

    kind: Literal["ekfac", "kfac"] | None = None
    fisher: Literal["true", "empirical"] | None = None
    damping_factor: float | None = Field(None, gt=0)
    curvature_samples: int | None = Field(None, ge=1, le=INT32_MAX)
    candidates: int | None = Field(None, ge=1, le=INT32_MAX)
    gradient_cache: bool | None = None
    projection: Projection | None = None
    projection_dim: int | None = Field(None, ge=1, le=1 << 20)
    batch_size: int | None = Field(None, ge=1, le=256)
    max_length: int | None = Field(None, ge=16, le=8192)
    precision: Literal["fp32", "bf16"] | None = None
    seed: int | None = Field(None, ge=-INT32_MAX, le=INT32_MAX)


class RecommenderCreate(RequestModel):
    name: Text = Field(min_length=1, max_length=200)
    base_model_id: Id
    adapter_file_id: Id
    data: DataFiles
    index: IndexOptions = Field(default_factory=IndexOptions)
    decoding: Decoding = Field(
        Decoding.CONSTRAINED,
        description="how jobs decode this recommender's lists unless a job's options say "
        "otherwise: constrained (the K best catalog items) or grounded (BIGRec)",
    )


class RecommenderOut(BaseModel):
    id: str
    object: Literal["recommender"] = "recommender"
    name: str
    base_model_id: str
    adapter_file_id: str
    data: dict[str, str]
    index: dict[str, Any]
    decoding: Decoding
    state: VersionState = Field(description="of version 1: indexing, then ready or failed")
    stage: str | None
    progress: float | None
    error: JobError | None
    latest_version: int
    created_at: datetime


class VersionOut(BaseModel):
    object: Literal["recommender.version"] = "recommender.version"
    recommender_id: str
    number: int
    parent: int | None = Field(description="the version the job that made this one started from")
    job_id: str | None
    digest: str = Field(description="sha256 of the adapter archive; its ETag")
    bytes: int
    state: VersionState = Field(description="of this version's training-set index")
    stage: str | None
    progress: float | None
    error: JobError | None
    created_at: datetime
    ready_at: datetime | None
