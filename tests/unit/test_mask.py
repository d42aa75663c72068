"""Mask learning on synthetic influence scores with a known answer."""

from __future__ import annotations

import torch

from fudlr.repair.config import MaskConfig
from fudlr.repair.mask import (
    FairnessTarget,
    _t_as_z,
    cross_fitted_test,
    fairness_gradient,
    learn_mask,
)


def _target(scores: torch.Tensor) -> FairnessTarget:
    """Two groups, 70%/30% recommended against 50%/50% in histories; `scores` [n, 2]."""
    return FairnessTarget(
        "item:g:MGU@1",
        "mgu",
        1.0,
        values=torch.tensor([0.7, 0.3], dtype=torch.float64),
        reference=torch.tensor([0.5, 0.5], dtype=torch.float64),
        scores=scores,
    )


def _problem(helpful: int = 30, n: int = 300, seed: int = 0):
    """Two groups, 70%/30% recommended against 50%/50% in histories; `helpful` samples each
    move 1% of the share from group 0 to group 1 when removed, the rest add noise."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, 2, generator=generator, dtype=torch.float64) * 1e-4
    scores[:helpful, 0] -= 0.01
    scores[:helpful, 1] += 0.01
    target = _target(scores)
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


def test_samples_whose_removal_would_hurt_are_reinforced_when_allowed() -> None:
    # 30 samples teach the under-served group 1: removing one moves 1% of the share to
    # group 0; removal alone has nothing to offer
    target, loss_scores = _problem(helpful=0)
    target.scores[:30] += torch.tensor([0.01, -0.01], dtype=torch.float64)
    assert learn_mask([target], 1.0, loss_scores, MaskConfig()).indices == []

    selection = learn_mask([target], 1.0, loss_scores, MaskConfig(max_upweight=2.0))
    # each reinforced twice: 10 of them close the 0.2 gap, more would overshoot
    assert set(selection.indices) <= set(range(30)) and len(selection.indices) == 10
    assert bool((selection.weights[selection.indices] == -2.0).all())
    assert selection.predicted["reinforced"] == 20.0 and selection.predicted["removed"] == 0.0
    assert selection.predicted["item:g:MGU@1:after"] < 0.02


def test_removal_and_reinforcement_combine() -> None:
    target, loss_scores = _problem(helpful=5)  # 5 removals close a quarter of the gap
    target.scores[5:10] += torch.tensor([0.01, -0.01], dtype=torch.float64)
    selection = learn_mask([target], 1.0, loss_scores, MaskConfig(max_upweight=3.0))
    weights = selection.weights
    assert set(selection.indices) <= set(range(10))
    # the five removals (weight 1) and the five reinforcements (weight -3) together close
    # the 0.2 gap exactly: 5 x 1% + 5 x 3%
    assert bool((weights[:5] == 1.0).all()) and bool((weights[5:10] == -3.0).all())
    assert selection.predicted["item:g:MGU@1:after"] < 0.02


def _diffuse(
    helpful: int, n: int = 300, users: int = 40, seed: int = 0, shift: float = 1e-3
) -> tuple[FairnessTarget, torch.Tensor, torch.Tensor]:
    """Per-user share scores [n, U, 2]: `helpful` samples move `shift` of share from the
    over-served group 0 to group 1 for the average user (the spread over users is 1e-3),
    the rest only add user-to-user noise."""
    generator = torch.Generator().manual_seed(seed)
    per_user = torch.randn(n, users, 1, generator=generator, dtype=torch.float64) * 1e-3
    per_user[:helpful] -= shift
    per_user = torch.cat([per_user, -per_user], dim=2)
    target = _target(per_user.mean(dim=1))
    (direction,) = fairness_gradient([target], MaskConfig())
    loss_scores = torch.zeros(n, dtype=torch.float64)
    return target, loss_scores, per_user @ direction


BY_SAMPLE = MaskConfig(eligibility="samples")


def test_a_bias_spread_over_most_samples_is_found_against_the_users_noise() -> None:
    # 200 of 300 samples help a little: against the spread between samples none stands out
    target, loss_scores, user_marginals = _diffuse(helpful=200)
    by_spread = learn_mask([target], 1.0, loss_scores, BY_SAMPLE)
    assert by_spread.eligibility_test == "samples" and by_spread.eligible < 20
    # against the spread over the query users, each helps significantly (t ≈ -6)
    by_users = learn_mask([target], 1.0, loss_scores, BY_SAMPLE, None, user_marginals)
    assert by_users.eligibility_test == "users" and by_users.selection_test is None
    assert by_users.eligible >= 190 and by_users.indices
    assert set(by_users.indices) <= set(range(200))
    assert by_users.sample_tests["discoveries"] == by_users.eligible


def test_a_bias_too_thin_for_any_sample_alone_is_found_by_testing_the_selection() -> None:
    # 100 of 300 samples help by a fifth of the users' spread: t ≈ 1.3 each, so Benjamini-
    # Hochberg over 300 tests discovers few, while a selection of many is clearly helpful
    target, loss_scores, user_marginals = _diffuse(helpful=100, shift=2e-4, seed=1)
    per_sample = learn_mask([target], 1.0, loss_scores, BY_SAMPLE, None, user_marginals)
    selection = learn_mask([target], 1.0, loss_scores, MaskConfig(), None, user_marginals)
    assert len(per_sample.indices) <= 5
    assert selection.eligibility_test == "selection" and selection.selection_test.p < 0.05
    planted = sum(index < 100 for index in selection.indices)
    assert len(selection.indices) >= 30 and planted >= 0.6 * len(selection.indices)


def test_without_a_consistent_effect_over_users_nothing_is_selected() -> None:
    target, loss_scores, user_marginals = _diffuse(helpful=0)
    per_sample = learn_mask([target], 1.0, loss_scores, BY_SAMPLE, None, user_marginals)
    assert per_sample.eligible <= 3 and per_sample.eligibility_test == "users"
    selection = learn_mask([target], 1.0, loss_scores, MaskConfig(), None, user_marginals)
    # every sample whose noise points the helpful way is a candidate; the test rejects them
    assert selection.eligible > 100 and not selection.indices
    assert selection.selection_test.p > 0.05 and not selection.weights.any()


def test_an_effect_every_sample_shares_is_no_reason_to_select_any() -> None:
    # removing any sample helps as much as removing the selection: random removal would do
    target, loss_scores, user_marginals = _diffuse(helpful=300)
    per_sample = learn_mask([target], 1.0, loss_scores, BY_SAMPLE, None, user_marginals)
    assert per_sample.eligible == 300  # each sample's own test cannot tell
    selection = learn_mask([target], 1.0, loss_scores, MaskConfig(), None, user_marginals)
    assert not selection.indices and selection.selection_test.p > 0.05


def test_the_selection_test_holds_its_level_on_pure_noise() -> None:
    weights = torch.zeros(300, dtype=torch.float64)
    weights[:30] = 1.0
    p_values = [
        cross_fitted_test(_diffuse(helpful=0, seed=seed)[2], weights).p for seed in range(200)
    ]
    # at most ~5% below 0.05 (binomial: 10 ± 3), and not stuck at 1 either
    assert sum(p < 0.05 for p in p_values) <= 20
    assert 0.3 < sorted(p_values)[100] < 0.7


def test_the_selection_test_takes_each_kind_of_weight_where_it_helps() -> None:
    # removing samples 0-19 helps, reinforcing samples 20-39 helps (their removal hurts)
    generator = torch.Generator().manual_seed(3)
    marginals = torch.randn(200, 30, generator=generator, dtype=torch.float64)
    marginals[:20] -= 1.0
    marginals[20:40] += 1.0
    for kind in (1.0, -2.0):  # 20 removals; 20 reinforcements counted twice more
        weights = torch.zeros(200, dtype=torch.float64)
        weights[:20] = kind
        test = cross_fitted_test(marginals, weights)
        assert test.p < 1e-3 and test.effect < 0


def test_the_t_statistic_matches_student_t_tail_probabilities() -> None:
    # rows whose t statistic is exactly the 97.5% quantile of Student t (ν = 4: 2.7764)
    users = 5
    deviations = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    error = deviations.std() / users**0.5
    row = 2.7764 * error + deviations
    z = _t_as_z(row[None, :])
    assert abs(float(torch.special.ndtr(-z)) - 0.025) < 2e-3
