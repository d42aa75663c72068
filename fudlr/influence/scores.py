"""Influence scores: s_i^q = (1/n) ∇q · H⁻¹ ∇ℓ_i for every training sample i and query q.

One preconditioned vector per query (`TrainingIndex.precondition`, in the coordinates of
the cached rows), then one dot product per sample (from the gradient cache, or a pass
over the training set when the index has no cache).
"""

from __future__ import annotations

import torch

from fudlr.influence.gradients import GradientRows, dot_with_queries


def influence_scores(
    rows: GradientRows, preconditioned: torch.Tensor, count: int, training_samples: int
) -> torch.Tensor:
    """[count, k]: the predicted change of each query if each of the `count` rows' samples
    were removed from a training set of `training_samples`."""
    return dot_with_queries(rows, preconditioned.T.contiguous(), count) / training_samples
