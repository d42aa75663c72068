"""The debias job: queries → influence scores → mask → Newton step → guard → adapter + report.

`DebiasJob` is what the CLI and the workers run; `run` calls the stages in order, each in
a module of its own (queries, selection, acceptance, report), each a function of the job,
so tests and benchmarks can run them one by one. Everything that needs no model is checked
before the model loads; progress and milestones go through a Control, which also cancels
between batches; nothing is written unless the guard accepts a step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from fudlr.control import Control
from fudlr.data.bundle import Bundle, subset
from fudlr.data.schema import SampleRow
from fudlr.errors import FudlrError, InputError
from fudlr.recommender.recommend import Ranked
from fudlr.repair.acceptance import Guard, rank_step_sizes
from fudlr.repair.config import (
    DebiasConfig,
    check_job,
    check_projection,
    guard_subset,
    screened,
)
from fudlr.repair.guard import (
    Measurement,
    cached_measure,
    measurement_key,
    measurement_of,
    unmeasured_utility,
)
from fudlr.repair.guard import measure as measure_recommendations
from fudlr.repair.mask import Selection
from fudlr.repair.queries import compute_queries, surrogate_tracking
from fudlr.repair.report import JobReport, Metrics, write_report
from fudlr.repair.selection import (
    empty_selection_reason,
    newton_step,
    predicted_share_changes,
    score_samples,
    select_samples,
)
from fudlr.repair.unlearn import WeightPatcher


class RepairRejected(FudlrError):
    """No step size passed the guard (or nothing could be selected); nothing was published.

    `report`: what the job found (the surrogates and their calibration, the selected
    samples and predictions, every guard attempt), so a rejection can be diagnosed.
    """

    def __init__(self, reason: str, report: dict | None = None) -> None:
        super().__init__(reason)
        self.report = report


class DebiasJob:
    """One debias job over one adapter version and its training-set index."""

    def __init__(
        self,
        base_model_dir: Path,
        adapter_dir: Path,
        bundle: Bundle,
        index_dir: Path,
        config: DebiasConfig,
        device: str = "auto",
        progress: Control | None = None,
        measurements: Path | None = None,
    ) -> None:
        """`progress`: where progress and milestones go, and whether to cancel.
        `measurements`: where the unpatched adapter's measurements are cached (default:
        the method's cache; the service keeps one folder per version, removed with it)."""
        from fudlr.influence.index import (
            TrainingIndex,
            adapter_weights_digest,
            samples_digest,
            training_samples,
        )
        from fudlr.influence.tracker import lora_linears
        from fudlr.models.store import model_digest
        from fudlr.paths import cache_dir
        from fudlr.recommender.recommend import Recommender

        self.config, self.bundle, self.adapter_dir = config, bundle, adapter_dir
        self.measurements = measurements or cache_dir() / "measurements"
        self.progress = progress or Control()
        self.timings: dict[str, float] = {}  # seconds per stage
        self._clock = time.perf_counter()
        # biases the guard users' data cannot measure are refused, or dropped if allowed
        self.groups, config, self.dropped = check_job(bundle, config)
        self.config = config
        self._announce_dropped(self.dropped)
        self.samples = training_samples(bundle, adapter_dir)
        self.index = TrainingIndex.load(
            index_dir,
            base_model_digest=model_digest(base_model_dir),
            adapter_digest=adapter_weights_digest(adapter_dir),
            train_digest=samples_digest(self.samples),
        )
        self.recommender = Recommender.load(
            base_model_dir, adapter_dir, bundle, device, trainable=True
        )
        self.model, self.tokenizer = self.recommender.model, self.recommender.tokenizer
        self.linears = lora_linears(self.model)
        if tuple(linear.name for linear in self.linears) != self.index.layout.names:
            raise InputError("the index's LoRA layout differs from the adapter's", file=index_dir)
        check_projection(self.index.projection_kind, config.projection)
        # the indexed samples, in the order of the index's rows: what scores and selections
        # number (all training samples unless the index holds a subset)
        self.candidates = [self.samples[position] for position in self.index.candidates]
        self.layout = self.index.layout
        valid = bundle.split("valid")
        self.query_rows = subset(valid, config.query_users, config.seed)
        self.guard_rows = guard_subset(bundle, config)
        self.lap("load")

    def lap(self, stage: str) -> None:
        """Add the time since the last lap to `stage`'s."""
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._clock
        self._clock = now

    def measure(self, split: str, rows: Sequence[SampleRow]) -> Measurement:
        """The rows' recommendations at the current weights, measured."""
        config = self.config
        return measure_recommendations(
            self.recommender,
            self.bundle,
            split,
            rows,
            config.biases,
            config.accuracy_k,
            config.recommend,
        )

    def measure_lists(
        self, split: str, rows: Sequence[SampleRow], lists: dict, exact_matches: int
    ) -> Measurement:
        """The rows' recommendations, already decoded (`lists`: per user), measured."""
        config = self.config
        return measurement_of(
            self.bundle, split, rows, lists, config.biases, config.accuracy_k, exact_matches
        )

    def measure_original(
        self, split: str, rows: Sequence[SampleRow], ranked: Ranked | None = None
    ) -> Measurement:
        """The unpatched adapter's measurement, computed once per adapter and settings;
        from `ranked` (the rows' recommendations, already decoded) where given."""
        config = self.config
        manifest = self.index.manifest
        key = measurement_key(
            [manifest["base_model_digest"], manifest["adapter_digest"], self.bundle.digest()],
            split,
            rows,
            config.biases,
            config.accuracy_k,
            config.recommend,
        )

        def compute() -> Measurement:
            if ranked is None:
                return self.measure(split, rows)
            return self.measure_lists(split, rows, ranked.by_user(rows), ranked.exact_matches)

        return cached_measure(self.measurements, key, compute)

    def _announce_dropped(self, dropped: list[dict[str, str]]) -> None:
        for entry in dropped:
            self.progress.event(f"dropped {entry['bias']}: {entry['reason']}")

    def measurable(self, before: Measurement) -> Measurement:
        """The guard users' original measurement on the biases it can measure: a user bias
        with a group that has no hit among them is refused, or dropped where the job allows
        (then measured again from the same lists, without it)."""
        reasons = unmeasured_utility(before, self.config.biases)
        if not reasons:
            return before
        self.config, dropped = screened(self.config, reasons)
        self.dropped += dropped
        self._announce_dropped(dropped)
        return self.measure_lists("valid", self.guard_rows, before.top_lists, before.exact_matches)

    def run(self, out_dir: Path) -> dict:
        """All stages; writes out_dir/adapter only on success, out_dir/report.json also when
        nothing is selected or the guard rejects every step (status "rejected", no eta).
        Returns the report as written."""
        self.progress.event(f"measuring the recommender on {len(self.guard_rows)} validation users")
        before = self.measurable(self.measure_original("valid", self.guard_rows))
        config = self.config  # without the biases it could not measure
        self.lap("measure before")
        queries = compute_queries(self)
        scores, user_marginals = score_samples(self, queries)
        selection = select_samples(self, queries, scores, user_marginals)
        report = JobReport.found(self, queries, scores, selection, before)
        if not selection.indices:
            self._reject(out_dir, report, empty_selection_reason(selection, config.mask.fdr))
        patcher = WeightPatcher(self.model, newton_step(self, selection.indices, selection.weights))
        self.lap("unlearn")
        guard = Guard(self, patcher, selection, before)  # draws the random control's step now

        self.progress.event(
            f"trying {len(config.step_sizes)} step sizes on the {len(self.query_rows)} query users"
        )
        query_before = self.measure_original("valid", self.query_rows)
        predicted = predicted_share_changes(self, queries, scores, selection)
        report.step_search = rank_step_sizes(self, patcher, query_before, predicted)
        promising = [trial for trial in report.step_search if trial.improves]
        if not promising:
            self._reject(out_dir, report, "no step size lowers the bias on the query users")
        report.guard = guard.confirm(promising)
        accepted = report.guard[-1]
        if not accepted.accepted:
            patcher.restore()
            reason = "no step size passed the guard: " + "; ".join(
                f"eta={attempt.eta}: {attempt.reason}" for attempt in report.guard
            )
            self._reject(out_dir, report, reason)

        eta, after = accepted.eta, accepted.after
        report.eta, report.metrics.valid_after = eta, after
        report.accuracy, report.random_control = accepted.accuracy, accepted.random_control
        if config.random_control == "report":
            report.random_control = guard.random_control(eta, after)
        if config.test_users != 0:
            self.measure_test(report.metrics, patcher, eta)
        report.surrogate_tracking = surrogate_tracking(self, queries, before, after)
        self.lap("surrogate tracking")
        self.publish(out_dir / "adapter", patcher, selection, eta)
        self.lap("publish")
        report.seconds = self.timings
        return write_report(out_dir, report)

    def measure_test(self, metrics: Metrics, patcher: WeightPatcher, eta: float) -> None:
        """The test users after and before the step; the weights are left at the step."""
        config = self.config
        rows = subset(self.bundle.split("test"), config.test_users, config.seed + 2)
        self.progress.event(f"measuring {len(rows)} test users after and before")
        metrics.test_after = self.measure("test", rows)
        patcher.restore()
        metrics.test_before = self.measure_original("test", rows)
        patcher.apply(eta)
        self.lap("measure test")

    def publish(
        self, adapter_dir: Path, patcher: WeightPatcher, selection: Selection, eta: float
    ) -> None:
        """Save the patched adapter with its provenance, then go back to the original
        weights: whatever uses the job's model next starts from them (the benchmark's random
        removal once added its step on top of the published one)."""
        from fudlr.repair.unlearn import save_patched_adapter

        manifest = self.index.manifest
        provenance = {
            "parent_adapter_digest": manifest["adapter_digest"],
            "base_model_digest": manifest["base_model_digest"],
            "eta": eta,
            "removed_samples": int((selection.weights > 0).sum()),
            "reinforced_samples": int((selection.weights < 0).sum()),
            "biases": [bias.label for bias in self.config.biases],
        }
        save_patched_adapter(self.model, self.adapter_dir, adapter_dir, provenance)
        patcher.restore()

    def _reject(self, out_dir: Path, report: JobReport, reason: str) -> NoReturn:
        """Write what the job found (status "rejected", no adapter) and raise."""
        report.status, report.reason, report.seconds = "rejected", reason, self.timings
        raise RepairRejected(reason, write_report(out_dir, report))
