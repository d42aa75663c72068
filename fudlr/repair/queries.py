"""The queries: what the query users ask of every training sample.

Each bias becomes linearised quantities with their gradients: per item bias, the query
users' surrogate group shares (a softmax over a pool of items per user, at a temperature
calibrated to the shares decoding measures); per user bias, each group's loss. The
surrogates are differentiable stand-ins for the hard metrics; `surrogate_tracking` checks
afterwards whether they moved the way the hard metrics did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fudlr.fairness.metrics import group_shares
from fudlr.fairness.surrogates import (
    Pool,
    Quantities,
    calibrate_temperature,
    item_share_quantities,
    loss_quantities,
    mean_item_shares,
    sample_pools,
)
from fudlr.recommender.recommend import Decoding, Ranked
from fudlr.repair.guard import Measurement
from fudlr.repair.spec import BiasSpec

if TYPE_CHECKING:
    from fudlr.repair.pipeline import DebiasJob


@dataclass
class Queries:
    """The linearised quantities, and per item bias what its surrogate was built from."""

    quantities: Quantities
    history: dict[str, torch.Tensor]  # the query users' histories' group shares (GH)
    pools: dict[str, list[Pool]]  # the items scored per query user
    temperatures: dict[str, float]
    calibration: dict[str, dict]  # where the temperature was fitted: to what, how near


def compute_queries(job: DebiasJob) -> Queries:
    """Every linearised quantity with its gradient, and each item attribute's GH target."""
    config, rows, parts = job.config, job.query_rows, []
    history, pools, temperatures, calibration = {}, {}, {}, {}
    anchors, rankings = None, []
    item_biases = [b for b in config.biases if b.side == "item"]
    if item_biases and (config.anchored_pools or config.temperature is None):
        job.progress.event(f"recommending for the {len(rows)} query users")
        rankings, anchors = _recommendations_and_anchors(job)
        anchors = anchors if config.anchored_pools else None
        job.lap("queries: recommendations")
    for bias in item_biases:
        groups = job.groups[bias.label]
        neighborhoods = _neighborhoods(job, bias.k)
        pools[bias.label] = sample_pools(
            rows, groups, config.pool_per_group, config.seed, neighborhoods, anchors
        )
        temperature = config.temperature
        if temperature is None:
            temperature, calibration[bias.label] = _calibrate(
                job, bias, pools[bias.label], rankings
            )
            job.progress.event(f"{bias.label}: surrogate temperature {temperature:g}")
            job.lap("queries: temperature")
        temperatures[bias.label] = temperature
        parts.append(
            item_share_quantities(
                job.model,
                job.tokenizer,
                job.linears,
                job.layout,
                rows,
                pools[bias.label],
                groups,
                job.bundle.item_completions(),
                temperature=temperature,
                control=job.progress,
                label=bias.label,
                precision=job.index.precision,
            )
        )
        shares = group_shares((row.history for row in rows), groups)
        history[bias.label] = torch.tensor([shares[g] for g in groups.names], dtype=torch.float64)
        job.lap("queries: share gradients")
    parts.append(
        loss_quantities(
            job.model,
            job.tokenizer,
            job.linears,
            job.layout,
            rows,
            [job.groups[b.label] for b in config.biases if b.side == "user"],
            max_length=config.max_length,
            batch_size=config.batch_size,
            control=job.progress,
            precision=job.index.precision,
        )
    )
    job.lap("queries: loss gradients")
    return Queries(Quantities.concat(parts), history, pools, temperatures, calibration)


def _calibrate(
    job: DebiasJob, bias: BiasSpec, pools: list[Pool], rankings: list[list[str]]
) -> tuple[float, dict]:
    """The temperature at which the surrogate's shares come nearest the GP@K the query users'
    rankings measure, and what it was fitted to (the measured shares, the L1 distances)."""
    groups = job.groups[bias.label]
    measured = group_shares((ranking[: bias.k] for ranking in rankings), groups)
    temperature, distances = calibrate_temperature(
        job.model,
        job.tokenizer,
        job.query_rows,
        pools,
        job.bundle.item_completions(),
        torch.tensor([measured[g] for g in groups.names]),
        precision=job.config.recommend.precision,
    )
    return temperature, {"measured_GP": measured, "l1": distances}


def _neighborhoods(job: DebiasJob, k: int) -> dict[str, list[str]] | None:
    """Grounding turns one generated title into a list (the title's nearest items), so
    the surrogate counts that list's groups; a constrained list is the items' own."""
    if job.config.recommend.decoding == Decoding.GROUNDED:
        return job.recommender.neighborhoods(k)
    return None


def _recommendations_and_anchors(job: DebiasJob) -> tuple[list[list[str]], list[list[str]]]:
    """The query users' rankings, and per user the items decoding picks or nearly
    picks (its recommendation first), where the surrogate's probability mass must be
    right for its gradient to speak about them: a constrained list itself, or the
    items a grounded search's beams ground to. The recommendations are kept as the
    original's measurement of the query users, which the step search starts from (no
    second decoding); a constrained list is that measurement's, so a later job on the
    same version and users decodes nothing here."""
    rows, recommend = job.query_rows, job.config.recommend
    if recommend.decoding == Decoding.CONSTRAINED:
        measured = job.measure_original("valid", rows)
        rankings = [measured.top_lists[row.user_id] for row in rows]
        return rankings, rankings
    beams = job.recommender.generate_alternatives(rows, recommend)
    repeated = [row for row, texts in zip(rows, beams, strict=True) for _ in texts]
    grounded = job.recommender.rank_generations(
        repeated, [text for texts in beams for text in texts], recommend
    )
    best, anchors, start = [], [], 0
    for texts in beams:
        best.append(start)  # the best beam's: the recommendation
        anchors.append(
            list(dict.fromkeys(items[0] for items in grounded.rankings[start : start + len(texts)]))
        )
        start += len(texts)
    recommendations = Ranked(
        [grounded.generations[i] for i in best],
        [grounded.grounded_exactly[i] for i in best],
        [grounded.rankings[i] for i in best],
    )
    job.measure_original("valid", rows, recommendations)
    return recommendations.rankings, anchors


def surrogate_tracking(
    job: DebiasJob, queries: Queries, before: Measurement, after: Measurement
) -> dict[str, dict]:
    """How the surrogates moved under the accepted patch next to the hard metrics.

    Item biases: each group's surrogate share (query users, recomputed at the patched
    weights) against its GP@K (guard users). A tracking surrogate moves the same way.
    """
    tracking = {}
    for bias in job.config.biases:
        if bias.side != "item":
            continue
        columns = queries.quantities.columns(f"{bias.label}:share:")
        shares = mean_item_shares(
            job.model,
            job.tokenizer,
            job.query_rows,
            queries.pools[bias.label],
            job.bundle.item_completions(),
            queries.temperatures[bias.label],
            precision=job.index.precision,
        )
        names = job.groups[bias.label].names
        surrogate = {
            name: float(shares[i] - queries.quantities.values[column])
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


def _pearson(first: list[float], second: list[float]) -> float | None:
    """Pearson correlation, or None where it is undefined (a constant series)."""
    if len(first) < 3:
        return None
    stacked = torch.tensor([first, second], dtype=torch.float64)
    if bool((stacked.std(dim=1) == 0).any()):
        return None
    return float(torch.corrcoef(stacked)[0, 1])
