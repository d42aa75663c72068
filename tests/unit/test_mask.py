"""Mask learning on synthetic influence scores with a known answer."""

from __future__ import annotations

import torch

from fudlr.repair.config import MaskConfig
from fudlr.repair.mask import FairnessTarget, learn_mask


def _problem(helpful: int = 30, n: int = 300, seed: int = 0):
    """Two groups, 70%/30% recommended against 50%/50% in histories; `helpful` samples each
    move 1% of the share from group 0 to group 1 when removed, the rest add noise."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, 2, generator=generator, dtype=torch.float64) * 1e-4
    scores[:helpful, 0] -= 0.01
    scores[:helpful, 1] += 0.01
    target = FairnessTarget(
        "item:g:MGU@1",
        "mgu",
        1.0,
        values=torch.tensor([0.7, 0.3], dtype=torch.float64),
        reference=torch.tensor([0.5, 0.5], dtype=torch.float64),
        scores=scores,
    )
    loss_scores = torch.randn(n, generator=generator, dtype=torch.float64) * 1e-4
    return target, loss_scores


def test_the_mask_takes_just_enough_helpful_samples() -> None:
    target, loss_scores = _problem()
    selection = learn_mask([target], 1.0, loss_scores, MaskConfig())
    # 20 of the 30 helpful samples close the 0.2 gap exactly; more would overshoot
    assert set(selection.indices) <= set(range(30))
    assert len(selection.indices) == 20
    assert (
        selection.predicted["item:g:MGU@1:after"]
        < 0.02
        < 0.2
        == round(selection.predicted["item:g:MGU@1:before"], 6)
    )


def test_budgets_cap_the_selection() -> None:
    target, loss_scores = _problem()
    selection = learn_mask([target], 1.0, loss_scores, MaskConfig(max_fraction=0.02))
    assert len(selection.indices) <= 6

    # removing the helpful samples costs validation loss: the loss budget stops it
    costly = loss_scores.clone()
    costly[:30] = 0.01
    selection = learn_mask([target], 1.0, costly, MaskConfig(max_loss_increase=0.05))
    assert len(selection.indices) <= 5
    assert selection.predicted["valid_loss:after"] <= 1.05 + 1e-9


def test_nothing_helps_nothing_is_selected() -> None:
    target, loss_scores = _problem(helpful=0)
    selection = learn_mask([target], 1.0, loss_scores, MaskConfig())
    assert selection.indices == []  # noise-level scores do not earn a removal


def test_a_sample_over_the_loss_budget_does_not_block_the_rest() -> None:
    target, loss_scores = _problem(helpful=10)  # not enough to close the gap: all are wanted
    target.scores[0] = torch.tensor([-0.05, 0.05], dtype=torch.float64)  # the most helpful,
    loss_scores[0] = 0.03  # worth its cost to the objective, but alone over the 2% budget
    selection = learn_mask([target], 1.0, loss_scores, MaskConfig())
    assert 0 not in selection.indices
    assert set(selection.indices) == set(range(1, 10))
    assert selection.predicted["valid_loss:after"] <= 1.02 + 1e-9
