"""From the queries to the step: influence scores, the mask's selection, the Newton step.

Scores and selections number the job's candidates (the indexed training samples, in the
order of the index's rows); the step removes the selected samples' weighted gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from fudlr.repair import unlearn
from fudlr.repair.mask import FairnessTarget, Selection, fairness_gradient, learn_mask
from fudlr.repair.queries import Queries
from fudlr.repair.spec import BiasSpec

if TYPE_CHECKING:
    from fudlr.repair.pipeline import DebiasJob


def score_samples(job: DebiasJob, queries: Queries) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[n, k]: every candidate's predicted effect on every quantity if removed; and [n, U]:
    its marginal effect on the fairness objective through each query user (None without
    per-user gradients), from the same pass over the training gradients."""
    from fudlr.influence.scores import influence_scores

    quantities = queries.quantities
    count = len(quantities.names)
    gradients = quantities.gradients.float()
    if quantities.per_user is not None:
        # the objective's coefficients need only the quantities' values, not the scores
        unscored = targets(job.config.biases, queries, torch.zeros(0, count))
        direction = torch.zeros(count)
        coefficients = fairness_gradient(unscored, job.config.mask)
        for target, gradient in zip(unscored, coefficients, strict=True):
            direction[list(target.columns)] = gradient.float()
        per_user = torch.einsum("k,ukd->ud", direction, quantities.per_user)
        gradients = torch.cat([gradients, per_user])
    candidates = len(job.candidates)
    job.progress.event(f"scoring {candidates} training samples against {len(gradients)} queries")
    if job.index.cache is not None:
        rows = job.index.cache.read()
    else:
        rows = sample_gradients(job, range(candidates))
    scores = influence_scores(
        rows, job.index.precondition(gradients), candidates, job.index.samples
    )
    job.lap("scores")
    return scores[:, :count], (scores[:, count:] if len(gradients) > count else None)


def sample_gradients(
    job: DebiasJob, chosen: Sequence[int]
) -> Iterable[tuple[list[int], torch.Tensor]]:
    """Full gradients of the chosen candidates (positions in `job.candidates`), as rows:
    a dense cache's, or one pass over those samples (no cache, or a projected one)."""
    from fudlr.influence.gradients import compute_sample_gradients
    from fudlr.recommender.encoding import encode_sample

    if job.index.cache is not None and job.index.projection is None:
        return job.index.cache.read()
    chosen = list(chosen)
    encoded = [
        encode_sample(
            job.tokenizer,
            job.candidates[i].prompt,
            job.candidates[i].completion,
            job.config.max_length,
        )
        for i in chosen
    ]
    passes = compute_sample_gradients(
        job.model,
        job.linears,
        job.layout.flatten,
        encoded,
        batch_size=job.config.batch_size,
        pad_id=job.tokenizer.pad_token_id,
        control=job.progress,
        stage="training gradients",
        precision=job.index.precision,
    )
    return (([chosen[j] for j in indices], rows) for indices, rows, _ in passes)


def targets(
    biases: Sequence[BiasSpec], queries: Queries, scores: torch.Tensor
) -> list[FairnessTarget]:
    """Each bias as a function of its linearised quantities."""
    quantities, found = queries.quantities, []
    for bias in biases:
        if bias.side == "item":
            prefix = f"{bias.label}:share:"
            reference, kind = queries.history[bias.label], bias.metric.lower()
        else:
            prefix = f"user:{bias.attribute}:loglik:"
            reference, kind = None, "gap"
        columns = quantities.columns(prefix)
        values = quantities.values[columns]
        found.append(
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
    return found


def select_samples(
    job: DebiasJob,
    queries: Queries,
    scores: torch.Tensor,
    user_marginals: torch.Tensor | None,
) -> Selection:
    """The mask: which candidates to remove (or reinforce), and by how much."""
    quantities = queries.quantities
    loss_column = quantities.columns("accuracy:loss")[0]
    selection = learn_mask(
        targets(job.config.biases, queries, scores),
        float(quantities.values[loss_column]),
        scores[:, loss_column],
        job.config.mask,
        job.progress,
        user_marginals,
    )
    job.lap("mask")
    job.progress.event(
        f"selected {len(selection.indices)} of {len(job.candidates)} training samples"
    )
    return selection


def empty_selection_reason(selection: Selection, level: float) -> str:
    """Why nothing was selected: no candidate, or a selection no better than chance."""
    test = selection.selection_test
    if test is not None and test.p > level:
        return (
            f"the selection does not beat as many random samples on held-out query users "
            f"(cross-fitted p = {test.p:.3g} > {level:g})"
        )
    return "no training sample is predicted to reduce the bias within the budget"


def newton_step(
    job: DebiasJob, indices: list[int], weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The preconditioned step removing `weights` (over all candidates) of `indices`."""
    from fudlr.influence.gradients import weighted_sum

    total = weighted_sum(sample_gradients(job, indices), weights.float())
    return unlearn.newton_step(total, job.index.curvature, job.layout, job.index.samples)


def predicted_share_changes(
    job: DebiasJob, queries: Queries, scores: torch.Tensor, selection: Selection
) -> dict[str, dict[str, float]]:
    """Per item bias, each group's surrogate share change that the mask predicts for the
    full step (η = 1): first order, so η times it is the prediction at η."""
    predicted = {}
    for bias in job.config.biases:
        if bias.side == "item":
            columns = queries.quantities.columns(f"{bias.label}:share:")
            changes = selection.weights.to(scores.dtype) @ scores[:, columns]
            names = job.groups[bias.label].names
            predicted[bias.label] = dict(zip(names, changes.tolist(), strict=True))
    return predicted
