"""The debias job: queries → influence scores → mask → Newton step → guard → adapter + report.

`DebiasJob` is what the CLI and the workers run. Everything that needs no model is
checked before the model loads; progress and milestones go through a Control, which
also cancels between batches; nothing is written unless the guard accepts a step.
Each stage is a method, so tests and benchmarks can run them one by one.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from fudlr.control import Control
from fudlr.data.bundle import Bundle
from fudlr.data.schema import SampleRow
from fudlr.errors import FudlrError, InputError
from fudlr.fairness.metrics import group_shares
from fudlr.fairness.surrogates import Quantities
from fudlr.recommender.recommend import Decoding, Ranked
from fudlr.repair.config import (
    DebiasConfig,
    check_job,
    check_projection,
    guard_subset,
    screened,
    subset,
)
from fudlr.repair.guard import Measurement
from fudlr.repair.mask import FairnessTarget, Selection, learn_mask
from fudlr.repair.unlearn import WeightPatcher

REPORT = "report.json"


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
        control: Control | None = None,
        measurements: Path | None = None,
    ) -> None:
        """`measurements`: where the unpatched adapter's measurements are cached (default:
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
        self.control = control or Control()
        self.timings: dict[str, float] = {}
        self.step_search: list[dict] = []  # every η on the query users, best first (run())
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
        self._lap("load")

    def _lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._clock
        self._clock = now

    def measure(self, split: str, rows: Sequence[SampleRow]) -> Measurement:
        from fudlr.repair.guard import measure

        config = self.config
        return measure(
            self.recommender,
            self.bundle,
            split,
            rows,
            config.biases,
            config.accuracy_k,
            config.recommend,
        )

    def measure_original(
        self, split: str, rows: Sequence[SampleRow], ranked: Ranked | None = None
    ) -> Measurement:
        """The unpatched adapter's measurement, computed once per adapter and settings;
        from `ranked` (the rows' recommendations, already decoded) where given."""
        from fudlr.repair.guard import cached_measure, measurement_key, measurement_of

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
            return measurement_of(
                self.bundle,
                split,
                rows,
                ranked.by_user(rows),
                config.biases,
                config.accuracy_k,
                ranked.exact_matches,
            )

        return cached_measure(self.measurements, key, compute)

    def _announce_dropped(self, dropped: list[dict[str, str]]) -> None:
        for entry in dropped:
            self.control.event(f"dropped {entry['bias']}: {entry['reason']}")

    def measurable(self, before: Measurement) -> Measurement:
        """The guard users' original measurement on the biases it can measure: a user bias
        with a group that has no hit among them is refused, or dropped where the job allows
        (then measured again from the same lists, without it)."""
        from fudlr.repair.guard import measurement_of, unmeasured_utility

        reasons = unmeasured_utility(before, self.config.biases)
        if not reasons:
            return before
        self.config, dropped = screened(self.config, reasons)
        self.dropped += dropped
        self._announce_dropped(dropped)
        return measurement_of(
            self.bundle,
            "valid",
            self.guard_rows,
            before.top_lists,
            self.config.biases,
            self.config.accuracy_k,
            before.exact_matches,
        )

    def queries(self) -> tuple[Quantities, dict[str, torch.Tensor]]:
        """Every linearised quantity with its gradient, and each item attribute's GH target."""
        from fudlr.fairness.surrogates import (
            calibrate_temperature,
            item_share_quantities,
            loss_quantities,
            sample_pools,
        )

        config, parts, history = self.config, [], {}
        self.pools, self.temperatures, self.calibration = {}, {}, {}
        anchors, rankings = None, []
        item_biases = [b for b in config.biases if b.side == "item"]
        if item_biases and (config.anchored_pools or config.temperature is None):
            self.control.event(f"recommending for the {len(self.query_rows)} query users")
            rankings, anchors = self._recommendations_and_anchors()
            anchors = anchors if config.anchored_pools else None
            self._lap("queries: recommendations")
        for bias in item_biases:
            groups = self.groups[bias.label]
            pools = sample_pools(
                self.query_rows,
                groups,
                config.pool_per_group,
                config.seed,
                self._neighborhoods(bias.k),
                anchors,
            )
            self.pools[bias.label] = pools
            temperature = config.temperature
            if temperature is None:
                measured = group_shares((ranking[: bias.k] for ranking in rankings), groups)
                temperature, distances = calibrate_temperature(
                    self.model,
                    self.tokenizer,
                    self.query_rows,
                    pools,
                    self.bundle.item_completions(),
                    torch.tensor([measured[g] for g in groups.names]),
                    precision=config.recommend.precision,
                )
                self.calibration[bias.label] = {"measured_GP": measured, "l1": distances}
                self.control.event(f"{bias.label}: surrogate temperature {temperature:g}")
                self._lap("queries: temperature")
            self.temperatures[bias.label] = temperature
            parts.append(
                item_share_quantities(
                    self.model,
                    self.tokenizer,
                    self.linears,
                    self.layout,
                    self.query_rows,
                    pools,
                    groups,
                    self.bundle.item_completions(),
                    temperature=temperature,
                    control=self.control,
                    label=bias.label,
                )
            )
            shares = group_shares((row.history for row in self.query_rows), groups)
            history[bias.label] = torch.tensor(
                [shares[g] for g in groups.names], dtype=torch.float64
            )
            self._lap("queries: share gradients")
        parts.append(
            loss_quantities(
                self.model,
                self.tokenizer,
                self.linears,
                self.layout,
                self.query_rows,
                [self.groups[b.label] for b in config.biases if b.side == "user"],
                max_length=config.max_length,
                batch_size=config.batch_size,
                control=self.control,
            )
        )
        self._lap("queries: loss gradients")
        return Quantities.concat(parts), history

    def _neighborhoods(self, k: int) -> dict[str, list[str]] | None:
        """Grounding turns one generated title into a list (the title's nearest items), so
        the surrogate counts that list's groups; a constrained list is the items' own."""
        if self.config.recommend.decoding == Decoding.GROUNDED:
            return self.recommender.neighborhoods(k)
        return None

    def _recommendations_and_anchors(self) -> tuple[list[list[str]], list[list[str]]]:
        """The query users' rankings, and per user the items decoding picks or nearly
        picks (its recommendation first), where the surrogate's probability mass must be
        right for its gradient to speak about them: a constrained list itself, or the
        items a grounded search's beams ground to. The recommendations are kept as the
        original's measurement of the query users, which the step search starts from (no
        second decoding); a constrained list is that measurement's, so a later job on the
        same version and users decodes nothing here."""
        recommend = self.config.recommend
        if recommend.decoding == Decoding.CONSTRAINED:
            measured = self.measure_original("valid", self.query_rows)
            rankings = [measured.top_lists[row.user_id] for row in self.query_rows]
            return rankings, rankings
        beams = self.recommender.generate_alternatives(self.query_rows, recommend)
        repeated = [row for row, texts in zip(self.query_rows, beams, strict=True) for _ in texts]
        grounded = self.recommender.rank_generations(
            repeated, [text for texts in beams for text in texts], recommend
        )
        best, anchors, start = [], [], 0
        for texts in beams:
            best.append(start)  # the best beam's: the recommendation
            anchors.append(
                list(
                    dict.fromkeys(
                        items[0] for items in grounded.rankings[start : start + len(texts)]
                    )
                )
            )
            start += len(texts)
        recommendations = Ranked(
            [grounded.generations[i] for i in best],
            [grounded.grounded_exactly[i] for i in best],
            [grounded.rankings[i] for i in best],
        )
        self.measure_original("valid", self.query_rows, recommendations)
        return recommendations.rankings, anchors

    def scores(
        self, quantities: Quantities, history: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[n, k]: every training sample's predicted effect on every quantity if removed; and
        [n, U]: its marginal effect on the fairness objective through each query user (None
        without per-user gradients), from the same pass over the training gradients."""
        from fudlr.influence.scores import influence_scores
        from fudlr.repair.mask import fairness_gradient

        count = len(quantities.names)
        queries = quantities.gradients.float()
        if quantities.per_user is not None:
            # the objective's coefficients need only the quantities' values, not the scores
            targets = self.targets(quantities, history, torch.zeros(0, count))
            direction = torch.zeros(count)
            for target, gradient in zip(
                targets, fairness_gradient(targets, self.config.mask), strict=True
            ):
                direction[list(target.columns)] = gradient.float()
            per_user = torch.einsum("k,ukd->ud", direction, quantities.per_user)
            queries = torch.cat([queries, per_user])
        self.control.event(
            f"scoring {len(self.candidates)} training samples against {len(queries)} queries"
        )
        if self.index.cache is not None:
            rows = self.index.cache.read()
        else:
            rows = self._sample_gradients(range(len(self.candidates)))
        scores = influence_scores(
            rows, self.index.precondition(queries), len(self.candidates), self.index.samples
        )
        self._lap("scores")
        return scores[:, :count], (scores[:, count:] if len(queries) > count else None)

    def _sample_gradients(self, chosen: Sequence[int]):
        """Full gradients of the chosen candidates (positions in `self.candidates`), as rows:
        a dense cache's, or one pass over those samples (no cache, or a projected one)."""
        from fudlr.influence.gradients import compute_sample_gradients
        from fudlr.recommender.encoding import encode_sample

        if self.index.cache is not None and self.index.projection is None:
            return self.index.cache.read()
        chosen = list(chosen)
        encoded = [
            encode_sample(
                self.tokenizer,
                self.candidates[i].prompt,
                self.candidates[i].completion,
                self.config.max_length,
            )
            for i in chosen
        ]
        passes = compute_sample_gradients(
            self.model,
            self.linears,
            self.layout.flatten,
            encoded,
            batch_size=self.config.batch_size,
            pad_id=self.tokenizer.pad_token_id,
            control=self.control,
            stage="training gradients",
        )
        return (([chosen[j] for j in indices], rows) for indices, rows, _ in passes)

    def targets(
        self, quantities: Quantities, history: dict[str, torch.Tensor], scores: torch.Tensor
    ) -> list[FairnessTarget]:
        """Each bias as a function of its linearised quantities."""
        targets = []
        for bias in self.config.biases:
            if bias.side == "item":
                prefix = f"{bias.label}:share:"
                reference, kind = history[bias.label], bias.metric.lower()
            else:
                prefix = f"user:{bias.attribute}:loglik:"
                reference, kind = None, "gap"
            columns = quantities.columns(prefix)
            values = quantities.values[columns]
            targets.append(
                FairnessTarget(
                    bias.label,
                    kind,
                    bias.weight,
                    values,
                    torch.zeros_like(values) if reference is None else reference,
                    scores[:, columns],
                    tuple(columns),
                )
            )
        return targets

    def select(
        self,
        quantities: Quantities,
        history: dict[str, torch.Tensor],
        scores: torch.Tensor,
        user_marginals: torch.Tensor | None,
    ) -> Selection:
        loss_column = quantities.columns("accuracy:loss")[0]
        selection = learn_mask(
            self.targets(quantities, history, scores),
            float(quantities.values[loss_column]),
            scores[:, loss_column],
            self.config.mask,
            self.control,
            user_marginals,
        )
        self._lap("mask")
        self.control.event(
            f"selected {len(selection.indices)} of {len(self.candidates)} training samples"
        )
        return selection

    def newton_step(self, selection: Selection) -> dict[str, torch.Tensor]:
        step = self._newton_step(selection.indices, selection.weights)
        self._lap("unlearn")
        return step

    def _newton_step(self, indices: list[int], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """The preconditioned step removing `weights` (over all samples) of `indices`."""
        from fudlr.influence.gradients import weighted_sum
        from fudlr.repair.unlearn import newton_step

        total = weighted_sum(self._sample_gradients(indices), weights.float())
        return newton_step(total, self.index.curvature, self.layout, self.index.samples)

    def predicted_share_changes(
        self, quantities: Quantities, scores: torch.Tensor, selection: Selection
    ) -> dict[str, dict[str, float]]:
        """Per item bias, each group's surrogate share change that the mask predicts for the
        full step (η = 1): first order, so η times it is the prediction at η."""
        predicted = {}
        for bias in self.config.biases:
            if bias.side == "item":
                columns = quantities.columns(f"{bias.label}:share:")
                changes = selection.weights.to(scores.dtype) @ scores[:, columns]
                names = self.groups[bias.label].names
                predicted[bias.label] = dict(zip(names, changes.tolist(), strict=True))
        return predicted

    def rank_step_sizes(
        self,
        patcher: WeightPatcher,
        before: Measurement,
        predicted: dict[str, dict[str, float]],
    ) -> list[dict]:
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
        from fudlr.repair.guard import bias_change, ndcg_drop

        config, trials = self.config, []
        worse_in_a_row = 0
        for done, eta in enumerate(config.step_sizes, start=1):
            patcher.apply(eta)
            after = self.measure("valid", self.query_rows)
            change = bias_change(before.biases, after.biases, config.biases)
            drop = ndcg_drop(before, after)
            best = min((trial["bias_change"] for trial in trials), default=0.0)
            trials.append(
                {
                    "eta": eta,
                    "bias_change": change,
                    "ndcg_drop": drop,
                    "improves": change < 0,
                    "biases": after.biases,
                    "share_changes": self._share_changes(before, after, predicted, eta),
                }
            )
            self.control.step("step sizes on the query users", done, len(config.step_sizes))
            # counted only once a size has lowered the bias: larger sizes may all overshoot
            worse_in_a_row = worse_in_a_row + 1 if best < 0 <= change - best else 0
            if config.step_patience is not None and worse_in_a_row >= config.step_patience:
                break
        patcher.restore()
        self._lap("step search")
        return sorted(trials, key=lambda trial: trial["bias_change"])

    def random_control(
        self,
        patchers: tuple[WeightPatcher, WeightPatcher],
        eta: float,
        before: Measurement,
        after: Measurement,
    ) -> dict:
        """The same Newton step at the same η from as many random training samples (the
        selection's weights on them), measured on the guard users and compared with the
        selection's step (`after`, a paired bootstrap over the guard users). A selection that
        matters beats it; where it does not, the step's size, not the samples, moved the bias.
        `patchers`: the selection's, left applied at η, and the random samples'."""
        from fudlr.repair.guard import bias_change, bootstrap_no_reduction

        selected, random_samples = patchers
        selected.restore()  # both steps start from the original weights
        random_samples.apply(eta)
        try:
            control = self.measure("valid", self.guard_rows)
        finally:
            random_samples.restore()
            selected.apply(eta)
        biases = self.config.biases
        not_better = bootstrap_no_reduction(
            self.bundle, "valid", self.guard_rows, control, after, biases, self.config.seed
        )
        change = bias_change(before.biases, control.biases, biases)
        self.control.event(f"random control, eta={eta}: bias change {change:+.1%}")
        self._lap("random control")
        return {
            "eta": eta,
            "bias_change": change,
            "p_selection_not_better": not_better,
            "measurement": control,
        }

    def random_step(self, weights: Sequence[float]) -> dict[str, torch.Tensor]:
        """The Newton step of len(weights) training samples drawn at random (`seed`),
        carrying these weights: a selection's step without the selecting."""
        generator = random.Random(self.config.seed)
        chosen = sorted(generator.sample(range(len(self.candidates)), len(weights)))
        mask = torch.zeros(len(self.candidates), dtype=torch.float64)
        mask[chosen] = torch.tensor(list(weights), dtype=torch.float64)
        return self._newton_step(chosen, mask)

    def _share_changes(
        self,
        before: Measurement,
        after: Measurement,
        predicted: dict[str, dict[str, float]],
        eta: float,
    ) -> dict[str, dict[str, dict[str, float]]]:
        """Per item bias and group: the measured GP@K change and the predicted η·Δshare."""
        changes = {}
        for bias in self.config.biases:
            if bias.side == "item":
                was = before.shares(bias.attribute, bias.k)
                now = after.shares(bias.attribute, bias.k)
                changes[bias.label] = {
                    group: {"measured": now[group] - was[group], "predicted": eta * change}
                    for group, change in predicted[bias.label].items()
                }
        return changes

    def surrogate_tracking(
        self, quantities: Quantities, before: Measurement, after: Measurement
    ) -> dict:
        """How the surrogates moved under the accepted patch next to the hard metrics.

        Item biases: each group's surrogate share (query users, recomputed at the patched
        weights) against its GP@K (guard users). A tracking surrogate moves the same way.
        """
        from fudlr.fairness.surrogates import mean_item_shares

        tracking = {}
        for bias in self.config.biases:
            if bias.side != "item":
                continue
            columns = quantities.columns(f"{bias.label}:share:")
            shares = mean_item_shares(
                self.model,
                self.tokenizer,
                self.query_rows,
                self.pools[bias.label],
                self.bundle.item_completions(),
                self.temperatures[bias.label],
            )
            names = self.groups[bias.label].names
            surrogate = {
                name: float(shares[i] - quantities.values[column])
                for i, (name, column) in enumerate(zip(names, columns, strict=True))
            }
            hard = {
                name: after.shares(bias.attribute, bias.k)[name]
                - before.shares(bias.attribute, bias.k)[name]
                for name in names
            }
            agree = sum((surrogate[g] > 0) == (hard[g] > 0) for g in names if hard[g] != 0)
            moved = sum(1 for g in names if hard[g] != 0)
            tracking[bias.label] = {
                "surrogate_share_change": surrogate,
                f"GP@{bias.k}_change": hard,
                "sign_agreement": agree / moved if moved else None,
                "pearson": _pearson([surrogate[g] for g in names], [hard[g] for g in names]),
            }
        return tracking

    def run(self, out_dir: Path) -> dict:
        """All stages; writes out_dir/adapter only on success, out_dir/report.json also when
        nothing is selected or the guard rejects every step (status "rejected", no eta)."""
        from fudlr.repair.guard import (
            accuracy_check,
            beats_control,
            bootstrap_no_reduction,
            other_k_check,
            verdict,
        )
        from fudlr.repair.unlearn import save_patched_adapter

        self.control.event(f"measuring the recommender on {len(self.guard_rows)} validation users")
        before = self.measurable(self.measure_original("valid", self.guard_rows))
        config = self.config  # without the biases it could not measure
        self._lap("measure before")
        quantities, history = self.queries()
        scores, user_marginals = self.scores(quantities, history)
        selection = self.select(quantities, history, scores, user_marginals)
        metrics = {"valid": {"before": before.summary()}}
        if not selection.indices:
            reason = _empty_selection_reason(selection, config.mask.fdr)
            self._reject(out_dir, reason, quantities, scores, selection, metrics, [])
        patcher = WeightPatcher(self.model, self.newton_step(selection))
        random_patcher = None
        if config.random_control != "off":  # made now, while the weights are the original's
            weights = selection.weights[selection.indices].tolist()
            random_patcher = WeightPatcher(self.model, self.random_step(weights))
            self._lap("random control")
        self.control.event(
            f"trying {len(config.step_sizes)} step sizes on the {len(self.query_rows)} query users"
        )
        query_before = self.measure_original("valid", self.query_rows)
        predicted_shares = self.predicted_share_changes(quantities, scores, selection)
        self.step_search = self.rank_step_sizes(patcher, query_before, predicted_shares)
        promising = [trial for trial in self.step_search if trial["improves"]]
        if not promising:
            reason = "no step size lowers the bias on the query users"
            self._reject(out_dir, reason, quantities, scores, selection, metrics, [])

        attempts, accepted, control = [], None, None
        for trial in promising[: config.guard_tries]:
            eta = trial["eta"]
            patcher.apply(eta)
            after = self.measure("valid", self.guard_rows)
            no_reduction = bootstrap_no_reduction(
                self.bundle, "valid", self.guard_rows, before, after, config.biases, config.seed
            )
            accuracy = accuracy_check(
                self.guard_rows,
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
            attempt = {
                "eta": eta,
                "p_not_reduced": no_reduction,
                "accuracy": accuracy.describe(),
                **after.summary(),
            }
            if ok and config.random_control == "require":
                self._lap("guard")
                control = self.random_control((patcher, random_patcher), eta, before, after)
                ok, versus = beats_control(
                    before,
                    after,
                    control["measurement"],
                    config.biases,
                    control["p_selection_not_better"],
                    config.guard_confidence,
                )
                reason = versus if not ok else f"{reason}; {versus}"
                attempt["random_control"] = _control_summary(control, len(selection.indices))
            attempts.append({**attempt, "accepted": ok, "reason": reason})
            self.control.event(f"guard, eta={eta}: {'accepted' if ok else 'rejected'}: {reason}")
            if ok:
                accepted = (eta, after)
                break
        self._lap("guard")
        if accepted is None:
            patcher.restore()
            reason = "no step size passed the guard: " + "; ".join(
                f"eta={a['eta']}: {a['reason']}" for a in attempts
            )
            self._reject(out_dir, reason, quantities, scores, selection, metrics, attempts)
        eta, after = accepted
        metrics["valid"]["after"] = after.summary()
        if config.random_control == "report":
            control = self.random_control((patcher, random_patcher), eta, before, after)
        if config.test_users != 0:
            test_rows = subset(self.bundle.split("test"), config.test_users, config.seed + 2)
            self.control.event(f"measuring {len(test_rows)} test users after and before")
            test_after = self.measure("test", test_rows)
            patcher.restore()
            test_before = self.measure_original("test", test_rows)
            patcher.apply(eta)
            metrics["test"] = {"before": test_before.summary(), "after": test_after.summary()}
            self._lap("measure test")

        report = self._report(quantities, scores, selection, metrics, attempts, eta)
        # the published step's accuracy judgement (`resolved`: whether its budget could be)
        report["accuracy"] = attempts[-1]["accuracy"]
        report["random_control"] = control and _control_summary(control, len(selection.indices))
        report["surrogate_tracking"] = self.surrogate_tracking(quantities, before, after)
        provenance = {
            "parent_adapter_digest": self.index.manifest["adapter_digest"],
            "base_model_digest": self.index.manifest["base_model_digest"],
            "eta": eta,
            "removed_samples": int((selection.weights > 0).sum()),
            "reinforced_samples": int((selection.weights < 0).sum()),
            "biases": [bias.label for bias in config.biases],
        }
        save_patched_adapter(self.model, self.adapter_dir, out_dir / "adapter", provenance)
        # back to the original weights: whatever uses the job's model next starts from them
        # (the benchmark's random removal once added its step on top of the published one)
        patcher.restore()
        report["seconds"] = self.timings
        _write_report(out_dir, report)
        return report

    def _reject(
        self,
        out_dir: Path,
        reason: str,
        quantities: Quantities,
        scores: torch.Tensor,
        selection: Selection,
        metrics: dict,
        attempts: list[dict],
    ) -> None:
        """Write what the job found (status "rejected", no adapter) and raise."""
        report = self._report(quantities, scores, selection, metrics, attempts, None)
        report.update(status="rejected", reason=reason, seconds=self.timings)
        _write_report(out_dir, report)
        raise RepairRejected(reason, report)

    def _report(
        self,
        quantities: Quantities,
        scores: torch.Tensor,
        selection: Selection,
        metrics: dict,
        attempts: list[dict],
        eta: float | None,
    ) -> dict:
        names = quantities.names
        return {
            "status": "succeeded",
            "biases": [bias.label for bias in self.config.biases],
            "dropped_biases": self.dropped,
            "config": asdict(self.config),
            "training_samples": self.index.samples,
            "candidates": len(self.candidates),
            "eta": eta,
            "surrogates": dict(zip(names, quantities.values.tolist(), strict=True)),
            "temperatures": self.temperatures,
            "temperature_calibration": self.calibration,
            "eligible": selection.eligible,
            "eligibility_test": selection.eligibility_test,
            "selection_test": selection.selection_test and asdict(selection.selection_test),
            "sample_tests": selection.sample_tests,
            "predicted": selection.predicted,
            "metrics": metrics,
            "step_search": self.step_search,
            "guard": attempts,
            "selected": [
                {
                    "sample_id": self.candidates[i].sample_id,
                    "weight": float(selection.weights[i]),
                    "scores": dict(zip(names, scores[i].tolist(), strict=True)),
                }
                for i in selection.indices
            ],
        }


def _empty_selection_reason(selection: Selection, level: float) -> str:
    """Why nothing was selected: no candidate, or a selection no better than chance."""
    test = selection.selection_test
    if test is not None and test.p > level:
        return (
            f"the selection does not beat as many random samples on held-out query users "
            f"(cross-fitted p = {test.p:.3g} > {level:g})"
        )
    return "no training sample is predicted to reduce the bias within the budget"


def _write_report(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")


def _control_summary(control: dict, samples: int) -> dict:
    """A random control for the report: its numbers and the random samples' metrics."""
    return {
        "eta": control["eta"],
        "samples": samples,
        "bias_change": control["bias_change"],
        "p_selection_not_better": control["p_selection_not_better"],
        **control["measurement"].summary(),
    }


def _pearson(first: list[float], second: list[float]) -> float | None:
    """Pearson correlation, or None where it is undefined (a constant series)."""
    if len(first) < 3:
        return None
    stacked = torch.tensor([first, second], dtype=torch.float64)
    if bool((stacked.std(dim=1) == 0).any()):
        return None
    return float(torch.corrcoef(stacked)[0, 1])
