"""IFairLRS reweighting (RW): retrain with weights that make targets look like histories.

A sample whose target is in group g gets W = GH(g) / GT(g): the group's share among the
training histories over its share among the training targets, averaged over the target's
groups (genres). Groups that are targets more often than they are watched weigh less, so
the fine-tuned model stops learning to over-produce them. Weights are scaled to mean 1
so the recipe's learning rate keeps its meaning.
"""

from __future__ import annotations

from collections.abc import Sequence

from fudlr.data.schema import SampleRow
from fudlr.errors import InputError
from fudlr.fairness.groups import Groups
from fudlr.fairness.metrics import group_shares


def ifairlrs_weights(samples: Sequence[SampleRow], groups: Groups) -> dict[str, float]:
    """sample_id -> weight (mean 1) for the IFairLRS reweighting of `samples`."""
    if not samples:
        raise InputError("no training samples to reweight")
    history = group_shares((s.history for s in samples), groups, source="the training histories")
    targets = group_shares(([s.target] for s in samples), groups, source="the training targets")
    raw = {}
    for sample in samples:
        names = groups.of(sample.target)
        if not names:
            raw[sample.sample_id] = 1.0  # a target without the attribute: left as it is
            continue
        raw[sample.sample_id] = sum(history[g] / targets[g] for g in names) / len(names)
    mean = sum(raw.values()) / len(raw)
    return {sample_id: weight / mean for sample_id, weight in raw.items()}
