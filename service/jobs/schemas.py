"""Debias jobs over HTTP: what a client submits and what it reads back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from fudlr.errors import InputError
from fudlr.influence.projection import Projection
from fudlr.models.device import Precision
from fudlr.recommender.recommend import Decoding
from fudlr.repair.config import (
    SETTINGS,
    DebiasConfig,
    Eligibility,
    RandomControl,
    check_distinct,
    check_step_sizes,
    job_config,
)
from fudlr.repair.spec import BiasSpec
from fudlr.states import JobState
from service.validation import INT32_MAX, Id, RequestModel, Text

_DECLARED: Any = object()


def from_setting(name: str, default: Any = _DECLARED, note: str = "", **limits: Any) -> Any:
    """The request field of the job setting `name`: its default, bounds and help as the
    method declares them (fudlr/repair/config.py), plus the API's own `limits` (what the
    database stores, what one request may cost), which may not restate a declared bound.
    `default` and `note`: where leaving the field out means something else here."""
    declared = SETTINGS[name]
    restated = declared.setting.bounds.keys() & limits.keys()
    if restated:
        raise TypeError(f"{name}: {', '.join(sorted(restated))} is declared by the setting")
    return Field(
        declared.default if default is _DECLARED else default,
        description=declared.setting.help + note,
        **declared.setting.bounds,
        **limits,
    )


@contextmanager
def _as_value_error() -> Iterator[None]:
    """The method's InputError as the ValueError that pydantic reports at the field being
    validated (with the API's field path)."""
    try:
        yield
    except InputError as error:
        raise ValueError(error.reason) from None


class Bias(RequestModel):
    """One fairness target: item groups' share of recommendations vs of histories (MGU,
    DGU), or the NDCG gap between user groups; `weight` when a job targets several."""

    side: Literal["item", "user"]
    attribute: Text = Field(min_length=1, max_length=100, pattern=r"^[^:@*]+$")
    metric: Text = Field(max_length=16, description="MGU or DGU for items, NDCG for users")
    k: int = Field(ge=1, le=1000)
    weight: float = Field(1.0, gt=0)

    @field_validator("metric")
    @classmethod
    def _upper(cls, metric: str) -> str:
        return metric.upper()

    @model_validator(mode="after")
    def _form(self) -> Bias:
        with _as_value_error():
            self.spec().check_form()
        return self

    def spec(self) -> BiasSpec:
        return BiasSpec(self.side, self.attribute, self.metric, self.k, self.weight)


class Budget(RequestModel):
    """How much the repair may change the adapter, and how sure the guard must be that
    it helped; each field is a setting of the method, described where it is declared."""

    max_fraction: float = from_setting("max_fraction")
    max_loss_increase: float = from_setting("max_loss_increase")
    max_ndcg_drop: float = from_setting("max_ndcg_drop")
    accuracy_k: int = from_setting("accuracy_k", le=1000)
    eligibility: Eligibility = from_setting("eligibility")
    fdr: float = from_setting("fdr")
    guard_confidence: float = from_setting("guard_confidence")
    max_upweight: float = from_setting("max_upweight")
    max_other_k_increase: float | None = from_setting("max_other_k_increase")


class Options(RequestModel):
    """Which users the job measures on, how it decodes and how it searches the step; each
    field is a setting of the method, described where it is declared."""

    query_users: int = from_setting("query_users", le=INT32_MAX)
    guard_users: int = from_setting("guard_users", le=INT32_MAX)
    test_users: int | None = from_setting("test_users", le=INT32_MAX)
    pool_per_group: int = from_setting("pool_per_group", le=64)
    anchored_pools: bool = from_setting("anchored_pools")
    temperature: float | None = from_setting("temperature", le=10)
    decoding: Decoding | None = from_setting(
        "decoding", default=None, note="; null: the recommender's own, filled in at submission"
    )
    num_beams: int = from_setting("num_beams", le=16)
    precision: Precision = from_setting("precision")
    projection: Projection | None = from_setting("projection")
    step_sizes: tuple[float, ...] = from_setting("step_sizes", min_length=1, max_length=16)
    guard_tries: int = from_setting("guard_tries", le=16)
    step_patience: int | None = from_setting("step_patience", le=16)
    random_control: RandomControl = from_setting("random_control")
    drop_unmeasurable: bool = from_setting(
        "drop_unmeasurable", note="; the dropped ones are in `metrics.dropped_biases`"
    )
    seed: int = from_setting("seed", ge=-INT32_MAX, le=INT32_MAX)

    @field_validator("step_sizes")
    @classmethod
    def _in_range(cls, sizes: tuple[float, ...]) -> tuple[float, ...]:
        with _as_value_error():
            check_step_sizes(sizes)
        return sizes


class JobSpec(RequestModel):
    """What the worker runs (stored on the job as submitted, defaults filled in)."""

    biases: list[Bias] = Field(min_length=1, max_length=8)
    budget: Budget = Field(default_factory=Budget)
    options: Options = Field(default_factory=Options)

    @field_validator("biases")
    @classmethod
    def _distinct(cls, biases: list[Bias]) -> list[Bias]:
        with _as_value_error():
            check_distinct([bias.spec() for bias in biases])
        return biases

    @model_validator(mode="after")
    def _valid_config(self) -> JobSpec:
        """Every other check of the method's own, so the API refuses at submission what the
        worker would refuse later (the field validators above say where)."""
        with _as_value_error():
            self.to_config()
        return self

    def to_config(self) -> DebiasConfig:
        """This specification as the method's configuration (what the worker runs)."""
        settings = self.budget.model_dump() | self.options.model_dump()
        if settings["decoding"] is None:  # the recommender's own: filled in at submission
            del settings["decoding"]
        return job_config([bias.spec() for bias in self.biases], settings)


class JobCreate(JobSpec):
    recommender_id: Id
    version: int | None = Field(None, ge=1, le=INT32_MAX, description="default: the latest version")


class JobError(BaseModel):
    code: str
    detail: str
    file: str | None = None
    line: int | None = None
    field: str | None = None


class JobMetrics(BaseModel):
    """Validation-split measurements before and after the patch, the influence model's
    prediction, and the test split's when measured; the published step's accuracy check
    (`accuracy`: NDCG@k drop, its interval, P(over budget), and `resolved`: false when the
    guard users had too few hits to resolve the budget); the biases left out because the
    guard users could not measure them (`dropped_biases`: {bias, reason})."""

    before: dict[str, Any] | None = None
    predicted: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    dropped_biases: list[dict[str, str]] | None = None


class JobOut(BaseModel):
    id: str
    object: Literal["job"] = "job"
    recommender_id: str
    version: int
    state: JobState
    stage: str | None
    progress: float | None
    attempts: int
    biases: list[str]
    spec: JobSpec
    metrics: JobMetrics
    result_version: int | None
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class EventOut(BaseModel):
    id: int
    created_at: datetime
    kind: Literal["state", "stage", "message"]
    message: str
    stage: str | None
    progress: float | None


class EventPage(BaseModel):
    data: list[EventOut]
    last_id: int | None = Field(description="pass as `after` to read only newer events")
