"""IFairLRS reranking (RR): push over-recommended item groups down the grounding ranking.

From the original recommender's top-K lists on validation users, each group's bias is
b_g = GP@K(g) / GH(g) - 1 (> 0: over-recommended). An item's grounding distance is
multiplied by exp(α · mean of b_g over its groups), so α = 0 is the original ranking and
a larger α trades accuracy for fairness; α is chosen on the validation split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fudlr.fairness.groups import Groups

ALPHAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def group_bias(recommended: Mapping[str, float], history: Mapping[str, float]) -> dict[str, float]:
    """b_g = GP(g) / GH(g) - 1; a group nobody watched gets 0 (nothing to compare with)."""
    return {g: recommended[g] / history[g] - 1.0 if history[g] > 0 else 0.0 for g in history}


def distance_scale(
    item_ids: Sequence[str], groups: Groups, bias: Mapping[str, float], alpha: float
) -> torch.Tensor:
    """[items]: the factor each item's grounding distance is multiplied by."""
    factors = []
    for item_id in item_ids:
        names = groups.of(item_id)
        penalty = sum(bias[g] for g in names) / len(names) if names else 0.0
        factors.append(math.exp(alpha * penalty))
    return torch.tensor(factors, dtype=torch.float64)


@dataclass(frozen=True)
class Candidate:
    """One α measured on validation users: its unfairness and accuracy."""

    alpha: float
    unfairness: float
    ndcg: float


def choose_alpha(candidates: Sequence[Candidate], max_ndcg_drop: float) -> Candidate:
    """The fairest α whose validation NDCG is within `max_ndcg_drop` of α = 0's (the same
    accuracy budget FUDLR's guard applies); ties go to the smaller α."""
    original = next((c for c in candidates if c.alpha == 0.0), None)
    if original is None:
        raise ValueError("the candidates must include alpha = 0 (the original ranking)")
    floor = original.ndcg * (1.0 - max_ndcg_drop)
    allowed = [c for c in candidates if c.ndcg >= floor]
    return min(allowed, key=lambda c: (c.unfairness, c.alpha))
