"""Stage 1: learn which training samples to remove (a mask over the training set).

Removing samples with weights m changes each linearised quantity q by Σ_i m_i s_i^q,
s_i^q = (1/n) ∇q·H⁻¹∇ℓ_i. The objective re-evaluates each fairness target from the
linearised quantities (group shares, group log-likelihoods) rather than following a
fixed gradient, so it bottoms out where the gap closes instead of overshooting:

    Σ_b w_b F_b(q + S m) / F_b(q)  +  α [ΔA(m)]₊ / A  +  β σ ‖m‖₁,   m ∈ [0, 1]^n

(convex: the quantities are affine in m and every term is convex in them) minimised by
Frank-Wolfe under the sample budget, then binarised (or kept soft) and cut to the loss
budget. With `max_upweight` u > 0 a sample may instead be reinforced, m_i ∈ [-u, 0]
(counted up to u more times): the samples whose removal would *hurt* are the ones whose
weight helps.

Whether the selection reflects a bias or the queries' noise is tested on the selection
(`eligibility="selection"`): the fairness queries are means over a sample of users, so each
sample's effect is a mean over those users (per-user marginals), and a selection chosen on
half of the users can be measured on the other half, against as many random samples. A
selection sums many samples' effects, so the test keeps its power for a diffuse bias,
where many samples help a little and none stands out alone. `eligibility="samples"` tests
each sample instead (one-sided p-values, Benjamini-Hochberg at false discovery rate `fdr`):
against the users' noise (a t-test per sample) where per-user marginals are given, else
against the spread between samples (robust z-scores: median, scaled median absolute
deviation). Either way pure noise selects nothing, whatever the scale of the scores
(which moves with the damping, the training-set size and the surrogate); β σ per sample
(σ the spread between samples) then prefers fewer removals among the candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fudlr.control import Control
from fudlr.repair.config import MaskConfig


@dataclass
class FairnessTarget:
    """One bias as a function of linearised quantities.

    kind: "mgu" (mean |q - reference|), "dgu" (max - min of q - reference), "gap" (max - min
    of q). values [G], reference [G] (GH for items; zeros for user gaps), scores [n, G].
    columns: where its quantities sit among all of a job's quantities.
    """

    label: str
    kind: str
    weight: float
    values: torch.Tensor
    reference: torch.Tensor
    scores: torch.Tensor
    columns: tuple[int, ...] = ()

    def evaluate(self, shifts: torch.Tensor, eps: float) -> torch.Tensor:
        """The target after shifting the quantities by `shifts` ([..., G])."""
        gaps = self.values + shifts - self.reference
        if self.kind == "mgu":
            return torch.sqrt(gaps.square() + eps**2).mean(dim=-1)
        return eps * (torch.logsumexp(gaps / eps, -1) + torch.logsumexp(-gaps / eps, -1))

    def exact(self, shifts: torch.Tensor) -> float:
        gaps = self.values + shifts - self.reference
        if self.kind == "mgu":
            return float(gaps.abs().mean())
        return float(gaps.max() - gaps.min())


@dataclass
class SelectionTest:
    """The cross-fitted test of a selection against random removal: `effect` is the mean
    per-user change of the fairness objective (its marginal units; negative: helps) beyond
    that of as many random samples with the same weights, `z` its t statistic as a normal
    quantile, `p` its one-sided p-value."""

    effect: float
    z: float
    p: float


@dataclass
class Selection:
    """The chosen samples (indices into the training set) with their weights (> 0: removed,
    < 0: reinforced), and predictions."""

    indices: list[int]
    weights: torch.Tensor  # [n], zero outside the selection
    predicted: dict[str, float]
    objective_trace: list[float]
    eligible: int = 0  # the mask's candidates
    # "selection": the selection's cross-fitted test; "users": each sample's t-test over the
    # query users; "samples": each sample's robust z against the other samples
    eligibility_test: str = "selection"
    selection_test: SelectionTest | None = None  # "selection" only: whether it was kept
    sample_tests: dict[str, float] = field(default_factory=dict)  # the per-sample p-values


def learn_mask(
    targets: Sequence[FairnessTarget],
    loss_value: float,
    loss_scores: torch.Tensor,
    config: MaskConfig | None = None,
    control: Control | None = None,
    user_marginals: torch.Tensor | None = None,
) -> Selection:
    """Minimise the objective over masks with at most `max_fraction` of the samples, then
    binarise (or keep soft weights) and cut to the loss budget.

    The quantities are affine in m and each target is convex in them, so the objective is
    convex over {m ∈ [0, 1]^n, Σm <= budget}. Frank-Wolfe suits that set: each step moves
    toward the vertex that takes the samples whose removal helps most (the budget's worth
    of the most negative gradient coordinates), as far as a line search finds best, so
    iterates stay feasible and no step size has to match the scale of the scores.
    `user_marginals` [n, U]: each sample's marginal effect on the fairness terms through
    each query user (their mean over users is the marginal itself; see `fairness_gradient`),
    which lets eligibility test against the query's own noise.
    """
    control = control or Control()
    config = config or MaskConfig()
    n = loss_scores.numel()
    budget = max(1, int(config.max_fraction * n))
    marginal = _marginal(targets, config)
    test = _test_kind(config, user_marginals)
    per_user = None if test == "samples" else user_marginals
    p_values, sample_tests = _sample_tests(marginal, config, per_user)
    bounds = _candidates(marginal, config, p_values if test != "selection" else None)
    eligible = int(bounds.ne(0).sum())
    mask = torch.zeros(n, dtype=torch.float64)
    if not eligible:
        predicted = predict(targets, loss_value, loss_scores, mask)
        return Selection([], mask, predicted, [], 0, test, None, sample_tests)
    sparsity = config.beta * _spread(marginal)
    objective = _Objective(targets, loss_value, loss_scores, config, sparsity, bounds)
    best_value, best_mask = float("inf"), mask
    trace = []
    for step in range(config.steps):
        mask.requires_grad_(True)
        value = objective(mask)
        (gradient,) = torch.autograd.grad(value, mask)
        mask = mask.detach()
        trace.append(value.item())
        if trace[-1] < best_value:
            best_value, best_mask = trace[-1], mask.clone()
        # the vertex: the budget's worth of samples that help most, each at its bound
        vertex = torch.zeros_like(mask)
        gain = -gradient * bounds
        helpful = torch.topk(gain, budget).indices
        helpful = helpful[gain[helpful] > 0]
        vertex[helpful] = bounds[helpful]

        def along(gamma: float, start: torch.Tensor = mask, end: torch.Tensor = vertex) -> float:
            return objective(start + gamma * (end - start)).item()

        mask = mask + _line_search(along) * (vertex - mask)
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            control.step("mask", step + 1, config.steps)

    if config.binarize:
        weights = _round(best_mask, gain, objective)
    else:
        weights = _apply_budget(
            torch.where(best_mask.abs() > 0.01, best_mask, 0.0),
            best_mask,
            loss_value,
            loss_scores,
            config,
        )
    selection_test = None
    if test == "selection" and bool(weights.ne(0).any()):
        selection_test = cross_fitted_test(user_marginals, weights)
        if selection_test.p > config.fdr:  # no better than chance on held-out users
            weights = torch.zeros_like(weights)
    indices = torch.nonzero(weights).flatten().tolist()
    predicted = predict(targets, loss_value, loss_scores, weights)
    return Selection(
        indices, weights, predicted, trace, eligible, test, selection_test, sample_tests
    )


def predict(
    targets: Sequence[FairnessTarget],
    loss_value: float,
    loss_scores: torch.Tensor,
    weights: torch.Tensor,
) -> dict[str, float]:
    """Each target's value before and as predicted after removing `weights` of the samples
    (negative weights: reinforcing them)."""
    predicted = {}
    for target in targets:
        predicted[f"{target.label}:before"] = target.exact(torch.zeros_like(target.values))
        predicted[f"{target.label}:after"] = target.exact(weights @ target.scores)
    predicted["valid_loss:before"] = loss_value
    predicted["valid_loss:after"] = loss_value + float(weights @ loss_scores)
    predicted["removed"] = float(weights.clamp(min=0).sum())
    predicted["reinforced"] = float(-weights.clamp(max=0).sum())
    return predicted


def _eps(target: FairnessTarget, config: MaskConfig) -> float:
    scale = float((target.values - target.reference).abs().max())
    return max(config.smoothing * scale, 1e-9)


def fairness_gradient(targets: Sequence[FairnessTarget], config: MaskConfig) -> list[torch.Tensor]:
    """Per target, ∂(fairness objective)/∂(its quantities) at m = 0, [G] each.

    The marginal effect of removing sample i is Σ_b scores_b[i] · this; since every query
    is a mean over users, the same coefficients applied to one user's query gradients give
    that sample's marginal through that user.
    """
    gradients = []
    for target in targets:
        shifts = torch.zeros_like(target.values, requires_grad=True)
        initial = target.evaluate(torch.zeros_like(target.values), _eps(target, config))
        value = target.weight * target.evaluate(shifts, _eps(target, config))
        (gradient,) = torch.autograd.grad(value / initial.clamp(min=1e-12), shifts)
        gradients.append(gradient)
    return gradients


def _marginal(targets: Sequence[FairnessTarget], config: MaskConfig) -> torch.Tensor:
    """Each sample's marginal effect on the fairness objective at m = 0 ([n]; < 0: its
    removal helps)."""
    return sum(
        target.scores @ gradient
        for target, gradient in zip(targets, fairness_gradient(targets, config), strict=True)
    )


def _spread(marginal: torch.Tensor) -> float:
    """σ, the spread of the marginals between samples: the scaled median absolute deviation."""
    return max(1.4826 * float((marginal - marginal.median()).abs().median()), 1e-12)


def _test_kind(config: MaskConfig, user_marginals: torch.Tensor | None) -> str:
    """Which test decides: a t-test needs a few users (ν = U - 1 >= 2), and the selection's
    test needs a few in each half."""
    users = 0 if user_marginals is None else user_marginals.size(1)
    if config.eligibility == "selection" and users >= 6:
        return "selection"
    return "users" if users >= 3 else "samples"


def _sample_tests(
    marginal: torch.Tensor, config: MaskConfig, user_marginals: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Every one-sided per-sample p-value (removal helps; with `max_upweight`, reinforcing
    helps too, n more), and their summary for the report.

    With `user_marginals` (enough users for a t-test): a t-test of each sample's mean over
    users. Without: robust z-scores against the other samples — median and MAD rather than
    mean and standard deviation, so that a block of truly harmful samples does not hide
    itself by inflating the noise estimate.
    """
    if user_marginals is not None:
        z_scores = _t_as_z(user_marginals.double())
    else:
        z_scores = (marginal - marginal.median()) / _spread(marginal)
    tests = [torch.special.ndtr(z_scores)]  # small: removal helps
    if config.max_upweight > 0:
        tests.append(torch.special.ndtr(-z_scores))  # small: reinforcing helps
    p_values = torch.cat(tests)
    summary = {
        "tests": p_values.numel(),
        "min_p": float(p_values.min()),
        "below_0.001": int(p_values.lt(1e-3).sum()),
        "expected_below_0.001": 1e-3 * p_values.numel(),
        "discoveries": int(_benjamini_hochberg(p_values, config.fdr).sum()),
    }
    return p_values, summary


def _candidates(
    marginal: torch.Tensor, config: MaskConfig, p_values: torch.Tensor | None
) -> torch.Tensor:
    """Each sample's bound [n]: 1 where it may be removed, -max_upweight where it may be
    reinforced, 0 elsewhere. With `p_values`, only where its own test is a discovery
    (Benjamini-Hochberg at `config.fdr` over every one-sided test made); without, wherever
    the sign of its marginal says it helps (the selection is tested afterwards)."""
    n = marginal.numel()
    if p_values is None:
        removable, reinforceable = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    else:
        discovered = _benjamini_hochberg(p_values, config.fdr)
        removable, reinforceable = discovered[:n], discovered[n:]
    bounds = torch.zeros(n, dtype=torch.float64)
    bounds[removable & (marginal < 0)] = 1.0
    if config.max_upweight > 0:
        bounds[reinforceable & (marginal > 0)] = -config.max_upweight
    return bounds


def cross_fitted_test(
    user_marginals: torch.Tensor, weights: torch.Tensor, seed: int = 0
) -> SelectionTest:
    """Does a selection like this one help on users it was not chosen on, more than random
    samples would?

    The query users are split in two halves. On each half, the samples most helpful there
    (as many as the selection holds, given its weights: most helpful first, removals among
    the samples whose removal helps, reinforcements among those whose removal hurts) are
    taken, and their effect is measured through every user of the other half, minus the
    effect of as many random samples with the same weights (the random control's
    expectation). Pooled over both halves, a one-sided t-test over the users. A selection
    is a sum of many samples' effects, so a bias spread thinly over many samples is found
    where no single sample passes its own test; and choosing on one half and measuring on
    the other keeps the selection's own noise out of the measurement.
    """
    samples, users = user_marginals.shape
    order = torch.randperm(users, generator=torch.Generator().manual_seed(seed))
    halves = (order[: users // 2], order[users // 2 :])
    effects = []
    for chosen_on, tested_on in (halves, halves[::-1]):
        marginal = user_marginals[:, chosen_on].mean(dim=1)
        fold = torch.zeros(samples, dtype=user_marginals.dtype)
        for sign in (1.0, -1.0):
            magnitudes = (weights * sign)[weights * sign > 0].sort(descending=True).values
            helpful = torch.nonzero(marginal * sign < 0).flatten()
            ranked = helpful[torch.argsort(marginal[helpful] * sign)][: magnitudes.numel()]
            fold[ranked] = sign * magnitudes[: ranked.numel()].to(fold.dtype)
        tested = user_marginals[:, tested_on]
        effects.append(fold @ tested - fold.sum() * tested.mean(dim=0))
    pooled = torch.cat(effects)
    z = float(_t_as_z(pooled[None])[0])
    return SelectionTest(float(pooled.mean()), z, float(torch.special.ndtr(torch.tensor(z))))


def _benjamini_hochberg(p_values: torch.Tensor, fdr: float) -> torch.Tensor:
    """Which hypotheses are discoveries at false discovery rate `fdr` (step-up procedure)."""
    count = p_values.numel()
    order = torch.argsort(p_values)
    thresholds = fdr * torch.arange(1, count + 1, dtype=torch.float64) / count
    passing = torch.nonzero(p_values[order] <= thresholds).flatten()
    discovered = torch.zeros(count, dtype=torch.bool)
    if passing.numel():
        discovered[order[: int(passing.max()) + 1]] = True
    return discovered


def _t_as_z(user_marginals: torch.Tensor) -> torch.Tensor:
    """Each row's one-sample t statistic (mean over users / its standard error), mapped to
    the normal quantile of the same tail probability. torch has no Student-t CDF; this is
    the Gaver-Kafadar form of Wallace's approximation, z = sign(t)·√(ν·ln(1 + t²/ν))·(8ν+1)/
    (8ν+3) with ν = U - 1, within ~1e-3 of the exact tail probability for ν >= 3."""
    users = user_marginals.size(1)
    mean = user_marginals.mean(dim=1)
    error = user_marginals.std(dim=1) / users**0.5
    tiny = torch.finfo(user_marginals.dtype).tiny
    t = mean / error.clamp(min=mean.abs() * 1e-12 + tiny)
    freedom = users - 1
    magnitude = torch.sqrt(freedom * torch.log1p(t.square() / freedom))
    return torch.sign(t) * magnitude * (8 * freedom + 1) / (8 * freedom + 3)


class _Objective:
    """The mask's objective as a function of the mask alone. Each sample's weight keeps
    the sign of its bound, so the sparsity term Σ sign(bound_i) m_i is β σ ‖m‖₁ there."""

    def __init__(
        self,
        targets: Sequence[FairnessTarget],
        loss_value: float,
        loss_scores: torch.Tensor,
        config: MaskConfig,
        sparsity: float,
        bounds: torch.Tensor,
    ) -> None:
        self.targets, self.config, self.bounds = targets, config, bounds
        self.loss_value, self.loss_scores = loss_value, loss_scores
        self.costs = sparsity * torch.sign(bounds)
        self.initial = {
            t.label: t.evaluate(torch.zeros_like(t.values), _eps(t, config)).clamp(min=1e-12)
            for t in targets
        }

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        fairness = sum(
            t.weight * t.evaluate(mask @ t.scores, _eps(t, self.config)) / self.initial[t.label]
            for t in self.targets
        )
        loss_increase = torch.relu(mask @ self.loss_scores) / max(abs(self.loss_value), 1e-12)
        return fairness + self.config.alpha * loss_increase + mask @ self.costs


def _line_search(objective: Callable[[float], float], steps: int = 40) -> float:
    """Golden-section search of a convex function on [0, 1]."""
    ratio = (5**0.5 - 1) / 2
    low, high = 0.0, 1.0
    for _ in range(steps):
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        if objective(left) <= objective(right):
            high = right
        else:
            low = left
    return (low + high) / 2


def _round(soft: torch.Tensor, gain: torch.Tensor, objective: _Objective) -> torch.Tensor:
    """The best mask at the bounds (1: removed, -max_upweight: reinforced) met while adding
    the samples in order of their soft weight's size (ties: the most helpful, by `gain`,
    first), skipping any sample that would break the loss budget. Thresholding a fractional
    optimum can overshoot badly; the scan keeps the loss budget and cannot end worse than
    changing nothing."""
    config, loss_scores = objective.config, objective.loss_scores
    ranking = sorted(range(soft.numel()), key=lambda i: (-abs(float(soft[i])), -float(gain[i])))
    budget = max(1, int(config.max_fraction * soft.numel()))
    candidates = [i for i in ranking if soft[i] != 0][:budget]
    allowed = config.max_loss_increase * abs(objective.loss_value)
    chosen = torch.zeros_like(soft)
    best = chosen.clone()
    best_value = objective(chosen).item()
    for index in candidates:
        chosen[index] = objective.bounds[index]
        if float(chosen @ loss_scores) > allowed:
            chosen[index] = 0.0  # a later, cheaper sample may still fit
            continue
        value = objective(chosen).item()
        if value < best_value:
            best, best_value = chosen.clone(), value
    return best


def _apply_budget(
    weights: torch.Tensor,
    mask: torch.Tensor,
    loss_value: float,
    loss_scores: torch.Tensor,
    config: MaskConfig,
) -> torch.Tensor:
    """Keep the `max_fraction` samples of largest |mask|, then drop the samples that cost the
    most validation loss until the predicted increase is within `max_loss_increase`."""
    weights = weights.clone()
    limit = int(config.max_fraction * weights.numel())
    chosen = torch.nonzero(weights).flatten()
    if chosen.numel() > limit:
        keep = chosen[torch.argsort(mask[chosen].abs(), descending=True)[:limit]]
        trimmed = torch.zeros_like(weights)
        trimmed[keep] = weights[keep]
        weights = trimmed
    allowed = config.max_loss_increase * abs(loss_value)
    chosen = torch.nonzero(weights).flatten()
    costs = weights[chosen] * loss_scores[chosen]
    for index in chosen[torch.argsort(costs, descending=True)].tolist():
        if float(weights @ loss_scores) <= allowed:
            break
        weights[index] = 0.0
    return weights
