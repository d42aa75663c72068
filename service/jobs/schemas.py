"""Debias jobs over HTTP: what a client submits and what it reads back."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from fudlr.errors import InputError
from fudlr.influence.projection import Projection
from fudlr.recommender.recommend import Decoding, RecommendConfig
from fudlr.repair.config import STEP_SIZES, DebiasConfig, MaskConfig, check_distinct, default
from fudlr.repair.spec import BiasSpec
from service.validation import INT32_MAX, Id, RequestModel, Text

JobState = Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]


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
        try:
            self.spec().check_form()
        except InputError as error:
            raise ValueError(error.reason) from None
        return self

    def spec(self) -> BiasSpec:
        return BiasSpec(self.side, self.attribute, self.metric, self.k, self.weight)


class Budget(RequestModel):
    """max_fraction: most training samples unlearned. max_loss_increase: largest predicted
    relative validation-loss increase. max_ndcg_drop: the accuracy budget, the largest
    relative drop of NDCG@accuracy_k the guard accepts: a step is refused when the drop
    exceeds it in at least guard_confidence of the bootstrap resamples of the guard users.
    accuracy_k: K of that NDCG, whatever the biases' K (at most the catalog).
    eligibility: "selection" (the selection must beat as many random samples on held-out
    query users) or "samples" (each sample's own effect must be significant,
    Benjamini-Hochberg). fdr: the level of that test (higher: more
    samples).
    guard_confidence: the share of paired bootstrap resamples of the guard users in which
    the bias must have gone down for a step to be published (0 = any measured drop).
    max_upweight: samples may also be reinforced, counted up to this many more times
    (0 = removal only). max_other_k_increase: largest relative increase of each bias at
    the other reported K (1, 5, 10) the guard accepts (null = reported, not judged)."""

    max_fraction: float = Field(0.2, gt=0, le=1)
    max_loss_increase: float = Field(0.02, ge=0)
    max_ndcg_drop: float = Field(0.05, ge=0, lt=1)
    accuracy_k: int = Field(default("accuracy_k"), ge=1, le=1000)
    eligibility: Literal["selection", "samples"] = "selection"
    fdr: float = Field(0.05, gt=0, lt=1)
    guard_confidence: float = Field(0.8, ge=0, lt=1)
    max_upweight: float = Field(0.0, ge=0)
    max_other_k_increase: float | None = Field(None, ge=0)


class Options(RequestModel):
    """query_users / guard_users: validation users behind the influence queries and the
    guard; test_users: measured before/after (null = all, 0 = skip); step_sizes: ranked
    by the bias change on the query users (largest first, stopping after `step_patience`
    sizes in a row worse than the best; null: all), and the guard confirms the best
    `guard_tries`;
    anchored_pools: the items each query user's beams ground to in its pool; temperature:
    of the surrogate's recommendation distribution (null = calibrated); random_control:
    the same step from as many random samples, which the selection must beat ("require"),
    or only measured ("report", the report's `random_control`), or "off";
    drop_unmeasurable: run on the biases the guard users can measure and report the
    others in `metrics.dropped_biases`, instead of refusing the job (`unmeasurable_bias`)."""

    query_users: int = Field(128, ge=1, le=INT32_MAX)
    guard_users: int = Field(256, ge=1, le=INT32_MAX)
    test_users: int | None = Field(None, ge=0, le=INT32_MAX)
    pool_per_group: int = Field(4, ge=1, le=64)
    anchored_pools: bool = True
    temperature: float | None = Field(None, gt=0, le=10)
    decoding: Decoding | None = Field(
        None,
        description="constrained (history items excluded) or grounded (the whole catalog "
        "ranked); null: the recommender's own, filled in at submission",
    )
    num_beams: int = Field(5, ge=1, le=16)
    precision: Literal["fp32", "bf16"] = "fp32"
    projection: Projection | None = Field(
        None,
        description="the gradient projection the version's index must store (eigenbasis or "
        "dense); null: whatever it stores. A mismatch is refused at submission.",
    )
    step_sizes: list[float] = Field(
        default_factory=lambda: list(STEP_SIZES),
        min_length=1,
        max_length=16,
    )
    guard_tries: int = Field(3, ge=1, le=16)
    step_patience: int | None = Field(2, ge=1, le=16)
    random_control: Literal["off", "report", "require"] = "require"
    drop_unmeasurable: bool = default("drop_unmeasurable")
    seed: int = Field(0, ge=-INT32_MAX, le=INT32_MAX)

    @field_validator("step_sizes")
    @classmethod
    def _in_range(cls, sizes: list[float]) -> list[float]:
        if any(not 0 < eta <= 4 for eta in sizes):
            raise ValueError("step sizes must be in (0, 4]")
        return sizes


class JobSpec(RequestModel):
    """What the worker runs (stored on the job as submitted, defaults filled in)."""

    biases: list[Bias] = Field(min_length=1, max_length=8)
    budget: Budget = Field(default_factory=Budget)
    options: Options = Field(default_factory=Options)

    @field_validator("biases")
    @classmethod
    def _distinct(cls, biases: list[Bias]) -> list[Bias]:
        try:
            check_distinct([bias.spec() for bias in biases])
        except InputError as error:
            raise ValueError(error.reason) from None
        return biases

    @model_validator(mode="after")
    def _valid_config(self) -> JobSpec:
        """Every other check of the method's own, so the API refuses at submission what the
        worker would refuse later (the field validators above say where)."""
        try:
            self.to_config()
        except InputError as error:
            raise ValueError(error.reason) from None
        return self

    def to_config(self) -> DebiasConfig:
        """This specification as the method's configuration (what the worker runs)."""
        budget, options = self.budget, self.options
        return DebiasConfig(
            biases=tuple(bias.spec() for bias in self.biases),
            mask=MaskConfig(
                max_fraction=budget.max_fraction,
                max_loss_increase=budget.max_loss_increase,
                eligibility=budget.eligibility,
                fdr=budget.fdr,
                max_upweight=budget.max_upweight,
            ),
            max_ndcg_drop=budget.max_ndcg_drop,
            accuracy_k=budget.accuracy_k,
            guard_confidence=budget.guard_confidence,
            max_other_k_increase=budget.max_other_k_increase,
            query_users=options.query_users,
            guard_users=options.guard_users,
            test_users=options.test_users,
            pool_per_group=options.pool_per_group,
            anchored_pools=options.anchored_pools,
            temperature=options.temperature,
            step_sizes=tuple(options.step_sizes),
            guard_tries=options.guard_tries,
            step_patience=options.step_patience,
            random_control=options.random_control,
            drop_unmeasurable=options.drop_unmeasurable,
            projection=options.projection,
            recommend=RecommendConfig(
                decoding=options.decoding or Decoding.CONSTRAINED,
                num_beams=options.num_beams,
                precision=options.precision,
            ),
            seed=options.seed,
        )


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
