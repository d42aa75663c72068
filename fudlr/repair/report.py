"""The job's report: what it found and decided, typed while it runs, read as report.json.

The service, the CLI and the benchmark read the JSON (a dict); `JobReport.as_dict` is the
one place that shapes it, and `write_report` the one place that writes it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fudlr.repair.config import DebiasConfig
from fudlr.repair.guard import AccuracyCheck, Measurement
from fudlr.repair.mask import Selection, SelectionTest

if TYPE_CHECKING:
    from fudlr.repair.pipeline import DebiasJob
    from fudlr.repair.queries import Queries

REPORT = "report.json"


@dataclass
class StepTrial:
    """One step size decoded on the query users (`improves`: the bias went down there)."""

    eta: float
    bias_change: float
    ndcg_drop: float
    improves: bool
    biases: dict[str, float]
    # per item bias and group: the measured GP@K change and the mask's predicted η·Δshare
    share_changes: dict[str, dict[str, dict[str, float]]]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RandomControl:
    """The selection's step at the same η from as many random training samples, measured on
    the guard users: what a step of that size does without the selecting."""

    eta: float
    samples: int
    bias_change: float
    p_selection_not_better: float
    measurement: Measurement

    def as_dict(self) -> dict:
        return {
            "eta": self.eta,
            "samples": self.samples,
            "bias_change": self.bias_change,
            "p_selection_not_better": self.p_selection_not_better,
            **self.measurement.summary(),
        }


@dataclass
class GuardAttempt:
    """One step size the guard measured on its users, and its verdict."""

    eta: float
    p_not_reduced: float
    accuracy: AccuracyCheck
    after: Measurement
    accepted: bool
    reason: str
    random_control: RandomControl | None = None  # measured only where the guard requires it

    def as_dict(self) -> dict:
        attempt = {
            "eta": self.eta,
            "p_not_reduced": self.p_not_reduced,
            "accuracy": self.accuracy.describe(),
            **self.after.summary(),
        }
        if self.random_control is not None:
            attempt["random_control"] = self.random_control.as_dict()
        return {**attempt, "accepted": self.accepted, "reason": self.reason}


@dataclass
class Metrics:
    """The guard users (validation) before and after the step; the test users where measured."""

    valid_before: Measurement
    valid_after: Measurement | None = None
    test_before: Measurement | None = None
    test_after: Measurement | None = None

    def as_dict(self) -> dict:
        valid = {"before": self.valid_before.summary()}
        if self.valid_after is not None:
            valid["after"] = self.valid_after.summary()
        metrics = {"valid": valid}
        if self.test_before is not None and self.test_after is not None:
            metrics["test"] = {
                "before": self.test_before.summary(),
                "after": self.test_after.summary(),
            }
        return metrics


@dataclass
class SelectedSample:
    """A training sample the step changes (weight > 0: removed, < 0: reinforced)."""

    sample_id: str
    weight: float
    scores: dict[str, float]  # its predicted effect on every quantity if removed


@dataclass
class JobReport:
    """Everything a job found, filled in stage by stage; a rejected job writes it too, so a
    rejection can be diagnosed."""

    biases: list[str]
    dropped_biases: list[dict[str, str]]
    config: DebiasConfig
    training_samples: int
    candidates: int
    surrogates: dict[str, float]
    temperatures: dict[str, float]
    temperature_calibration: dict[str, dict]
    eligible: int
    eligibility_test: str
    selection_test: SelectionTest | None
    sample_tests: dict[str, float]
    predicted: dict[str, float]
    metrics: Metrics
    selected: list[SelectedSample]
    status: str = "succeeded"  # or "rejected"
    eta: float | None = None  # the published step's
    step_search: list[StepTrial] = field(default_factory=list)
    guard: list[GuardAttempt] = field(default_factory=list)
    # a published step's only
    accuracy: AccuracyCheck | None = None
    random_control: RandomControl | None = None  # None where the job skips it
    surrogate_tracking: dict[str, dict] = field(default_factory=dict)
    reason: str = ""  # a rejection's only
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def found(
        cls,
        job: DebiasJob,
        queries: Queries,
        scores: torch.Tensor,
        selection: Selection,
        before: Measurement,
    ) -> JobReport:
        """What the job knows once it has selected: the rest is filled in as it goes on."""
        names = queries.quantities.names
        return cls(
            biases=[bias.label for bias in job.config.biases],
            dropped_biases=job.dropped,
            config=job.config,
            training_samples=job.index.samples,
            candidates=len(job.candidates),
            surrogates=dict(zip(names, queries.quantities.values.tolist(), strict=True)),
            temperatures=queries.temperatures,
            temperature_calibration=queries.calibration,
            eligible=selection.eligible,
            eligibility_test=selection.eligibility_test,
            selection_test=selection.selection_test,
            sample_tests=selection.sample_tests,
            predicted=selection.predicted,
            metrics=Metrics(before),
            selected=[
                SelectedSample(
                    job.candidates[i].sample_id,
                    float(selection.weights[i]),
                    dict(zip(names, scores[i].tolist(), strict=True)),
                )
                for i in selection.indices
            ],
        )

    def as_dict(self) -> dict:
        report = {
            "status": self.status,
            "biases": self.biases,
            "dropped_biases": self.dropped_biases,
            "config": asdict(self.config),
            "training_samples": self.training_samples,
            "candidates": self.candidates,
            "eta": self.eta,
            "surrogates": self.surrogates,
            "temperatures": self.temperatures,
            "temperature_calibration": self.temperature_calibration,
            "eligible": self.eligible,
            "eligibility_test": self.eligibility_test,
            "selection_test": self.selection_test and asdict(self.selection_test),
            "sample_tests": self.sample_tests,
            "predicted": self.predicted,
            "metrics": self.metrics.as_dict(),
            "step_search": [trial.as_dict() for trial in self.step_search],
            "guard": [attempt.as_dict() for attempt in self.guard],
            "selected": [asdict(sample) for sample in self.selected],
        }
        if self.status == "rejected":
            report["reason"] = self.reason
        else:
            report["accuracy"] = self.accuracy and self.accuracy.describe()
            report["random_control"] = self.random_control and self.random_control.as_dict()
            report["surrogate_tracking"] = self.surrogate_tracking
        report["seconds"] = self.seconds
        return report


def write_report(out_dir: Path, report: JobReport) -> dict:
    """Write out_dir/report.json; returns what it wrote, the dict the job's callers read."""
    written = report.as_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT).write_text(json.dumps(written, indent=2) + "\n")
    return written
