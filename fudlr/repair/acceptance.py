"""Acceptance: which step size, if any, the job may publish.

The step search decodes the query users at each η and ranks the sizes; the guard then
confirms the best few on its own users, who took no part in choosing them: the bias must
go down beyond their noise, accuracy must stay within its budget and, by default, the
selection's step must beat the same step from as many random training samples (the random
control).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fudlr.repair.guard import (
    Measurement,
    accuracy_check,
    beats_control,
    bias_change,
    bootstrap_no_reduction,
    ndcg_drop,
    other_k_check,
    verdict,
)
from fudlr.repair.mask import Selection
from fudlr.repair.report import GuardAttempt, RandomControl, StepTrial
from fudlr.repair.selection import newton_step
from fudlr.repair.spec import BiasSpec
from fudlr.repair.unlearn import WeightPatcher

if TYPE_CHECKING:
    from fudlr.repair.pipeline import DebiasJob


def rank_step_sizes(
    job: DebiasJob,
    patcher: WeightPatcher,
    before: Measurement,
    predicted: dict[str, dict[str, float]],
) -> list[StepTrial]:
    """Every step size's hard bias change on the query users (beam search + grounding,
    like the guard), best first; `improves`: the bias went down. The guard then confirms
    the best few, accuracy included, on its own users (a few dozen users' NDCG at small K
    is one or two hits: no basis to veto a step). Each trial also holds, per item bias,
    every group's measured GP@K change next to the mask's prediction η·Δshare
    (`share_changes`): whether the removal moves recommendations where the mask meant to.

    The step sizes are tried in the configured order (largest first by default); once
    one has lowered the bias, the search stops after `step_patience` sizes in a row
    that do no better than the best before them. Over η the bias change has one
    minimum (it overshoots above it and fades to zero below it), so the sizes after
    those would not be chosen, and each one costs a decoding of the query users.

    The Newton step is linear in the removal; the recommender is not, and a step can
    overshoot the histories' shares (measured in docs/method.md, "Step size on the query
    users"). Decoding the query users is what sees it, and choosing η on them keeps the
    guard's users out of the choice.
    """
    config, trials = job.config, []
    worse_in_a_row = 0
    for done, eta in enumerate(config.step_sizes, start=1):
        patcher.apply(eta)
        after = job.measure("valid", job.query_rows)
        change = bias_change(before.biases, after.biases, config.biases)
        best = min((trial.bias_change for trial in trials), default=0.0)
        trials.append(
            StepTrial(
                eta=eta,
                bias_change=change,
                ndcg_drop=ndcg_drop(before, after),
                improves=change < 0,
                biases=after.biases,
                share_changes=share_changes(config.biases, before, after, predicted, eta),
            )
        )
        job.progress.step("step sizes on the query users", done, len(config.step_sizes))
        # counted only once a size has lowered the bias: larger sizes may all overshoot
        worse_in_a_row = worse_in_a_row + 1 if best < 0 <= change - best else 0
        if config.step_patience is not None and worse_in_a_row >= config.step_patience:
            break
    patcher.restore()
    job.lap("step search")
    return sorted(trials, key=lambda trial: trial.bias_change)


def share_changes(
    biases: Sequence[BiasSpec],
    before: Measurement,
    after: Measurement,
    predicted: dict[str, dict[str, float]],
    eta: float,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per item bias and group: the measured GP@K change and the predicted η·Δshare."""
    changes = {}
    for bias in biases:
        if bias.side == "item":
            was = before.shares(bias.attribute, bias.k)
            now = after.shares(bias.attribute, bias.k)
            changes[bias.label] = {
                group: {"measured": now[group] - was[group], "predicted": eta * change}
                for group, change in predicted[bias.label].items()
            }
    return changes


def random_step(job: DebiasJob, weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The Newton step of len(weights) candidates drawn at random (`seed`), carrying these
    weights: a selection's step without the selecting."""
    generator = random.Random(job.config.seed)
    chosen = sorted(generator.sample(range(len(job.candidates)), len(weights)))
    mask = torch.zeros(len(job.candidates), dtype=torch.float64)
    mask[chosen] = torch.tensor(list(weights), dtype=torch.float64)
    return newton_step(job, chosen, mask)


class Guard:
    """Judges step sizes of the selection's step on the guard users against `before`, their
    original measurement. `patcher` moves the weights along the selection's step; the
    random control's step is drawn here, so make the guard while the weights are the
    original's."""

    def __init__(
        self, job: DebiasJob, patcher: WeightPatcher, selection: Selection, before: Measurement
    ) -> None:
        self.job, self.patcher, self.before = job, patcher, before
        self.samples = len(selection.indices)
        self.random_patcher = None
        if job.config.random_control != "off":
            weights = selection.weights[selection.indices].tolist()
            self.random_patcher = WeightPatcher(job.model, random_step(job, weights))
            job.lap("random control")

    def confirm(self, trials: Sequence[StepTrial]) -> list[GuardAttempt]:
        """The first `guard_tries` trials in turn until one is accepted, every attempt; the
        weights are left at the last one's η."""
        job, attempts = self.job, []
        for trial in trials[: job.config.guard_tries]:
            attempt = self.judge(trial.eta)
            attempts.append(attempt)
            outcome = "accepted" if attempt.accepted else "rejected"
            job.progress.event(f"guard, eta={attempt.eta}: {outcome}: {attempt.reason}")
            if attempt.accepted:
                break
        job.lap("guard")
        return attempts

    def judge(self, eta: float) -> GuardAttempt:
        """The step at η on the guard users: the bias down beyond their noise, accuracy
        within its budget (the other K's biases within theirs where capped) and, where
        required, better than the random control."""
        job, config, before = self.job, self.job.config, self.before
        self.patcher.apply(eta)
        after = job.measure("valid", job.guard_rows)
        no_reduction = bootstrap_no_reduction(
            job.bundle, "valid", job.guard_rows, before, after, config.biases, config.seed
        )
        accuracy = accuracy_check(
            job.guard_rows,
            before,
            after,
            config.max_ndcg_drop,
            config.guard_confidence,
            config.seed,
        )
        ok, reason = verdict(
            before, after, config.biases, accuracy, no_reduction, config.guard_confidence
        )
        if ok and config.max_other_k_increase is not None:
            ok, other = other_k_check(before, after, config.biases, config.max_other_k_increase)
            reason = reason if ok else other
        random_control = None
        if ok and config.random_control == "require":
            job.lap("guard")
            random_control = self.random_control(eta, after)
            ok, versus = beats_control(
                before,
                after,
                random_control.measurement,
                config.biases,
                random_control.p_selection_not_better,
                config.guard_confidence,
            )
            reason = versus if not ok else f"{reason}; {versus}"
        return GuardAttempt(eta, no_reduction, accuracy, after, ok, reason, random_control)

    def random_control(self, eta: float, after: Measurement) -> RandomControl:
        """The same Newton step at the same η from as many random candidates (the
        selection's weights on them), measured on the guard users and compared with the
        selection's step (`after`, a paired bootstrap over the guard users). A selection that
        matters beats it; where it does not, the step's size, not the samples, moved the
        bias. The selection's step is left applied at η."""
        job, config = self.job, self.job.config
        self.patcher.restore()  # both steps start from the original weights
        self.random_patcher.apply(eta)
        try:
            measured = job.measure("valid", job.guard_rows)
        finally:
            self.random_patcher.restore()
            self.patcher.apply(eta)
        not_better = bootstrap_no_reduction(
            job.bundle, "valid", job.guard_rows, measured, after, config.biases, config.seed
        )
        change = bias_change(self.before.biases, measured.biases, config.biases)
        job.progress.event(f"random control, eta={eta}: bias change {change:+.1%}")
        job.lap("random control")
        return RandomControl(eta, self.samples, change, not_better, measured)
