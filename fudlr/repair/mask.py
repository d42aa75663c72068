"""Stage 1: learn which training samples to remove (a mask over the training set).

Removing samples with weights m changes each linearised quantity q by Σ_i m_i s_i^q,
s_i^q = (1/n) ∇q·H⁻¹∇ℓ_i. The objective re-evaluates each fairness target from the
linearised quantities (group shares, group log-likelihoods) rather than following a
fixed gradient, so it bottoms out where the gap closes instead of overshooting:

    Σ_b w_b F_b(q + S m) / F_b(q)  +  α [ΔA(m)]₊ / A  +  β σ ‖m‖₁,   m ∈ [0, 1]^n

(convex: the quantities are affine in m and every term is convex in them) minimised by
Frank-Wolfe under the sample budget, then binarised (or kept soft) and cut to the loss
budget. Only samples whose marginal effect on the fairness terms at m = 0 is significantly
helpful are eligible (one-sided p-values, Benjamini-Hochberg at false discovery rate `fdr`).
The noise is the query's own where the per-user marginals are given: the fairness queries
are averages over a sample of users, so a sample's effect is a mean over those users, with
a standard error (a t-test per sample). That keeps its power for a diffuse bias, where many
samples help a little and none stands out from the rest. Without per-user marginals, the
noise is the spread between samples (robust z-scores: median, scaled median absolute
deviation). Either way pure noise selects nothing, whatever the scale of the scores
(which moves with the damping, the training-set size and the surrogate); β σ per sample
(σ the spread between samples) then prefers fewer removals among the eligible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
class Selection:
    """The chosen samples (indices into the training set) with their weights, and predictions."""

    indices: list[int]
    weights: torch.Tensor  # [n], zero outside the selection
    predicted: dict[str, float]
    objective_trace: list[float]
    eligible: int = 0  # samples whose effect stood out at the FDR (the mask's candidates)
    eligibility_test: str = "users"  # "users": t-test over query users; "samples": robust z


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
    initial = {t.label: t.evaluate(torch.zeros_like(t.values), _eps(t, config)) for t in targets}
    eligible, noise = _eligible(targets, config, user_marginals)
    test = "users" if _tests_users(user_marginals) else "samples"
    mask = torch.zeros(n, dtype=torch.float64)
    if not eligible.any():
        predicted = predict(targets, loss_value, loss_scores, mask)
        return Selection([], mask, predicted, [], 0, test)
    sparsity = config.beta * noise
    best_value, best_mask = float("inf"), mask
    trace = []
    for step in range(config.steps):
        mask.requires_grad_(True)
        objective = _objective(mask, targets, initial, loss_value, loss_scores, config, sparsity)
        (gradient,) = torch.autograd.grad(objective, mask)
        mask = mask.detach()
        trace.append(objective.item())
        if trace[-1] < best_value:
            best_value, best_mask = trace[-1], mask.clone()
        vertex = torch.zeros_like(mask)
        gain = torch.where(eligible, -gradient, 0.0)
        helpful = torch.topk(gain, budget).indices
        vertex[helpful[gain[helpful] > 0]] = 1.0

        def along(gamma: float, start: torch.Tensor = mask, end: torch.Tensor = vertex) -> float:
            point = start + gamma * (end - start)
            objective = _objective(
                point, targets, initial, loss_value, loss_scores, config, sparsity
            )
            return objective.item()

        mask = mask + _line_search(along) * (vertex - mask)
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            control.step("mask", step + 1, config.steps)

    if config.binarize:
        weights = _round(
            best_mask, gradient, targets, initial, loss_value, loss_scores, config, sparsity
        )
    else:
        weights = _apply_budget(
            torch.where(best_mask > 0.01, best_mask, 0.0),
            best_mask,
            loss_value,
            loss_scores,
            config,
        )
    indices = torch.nonzero(weights).flatten().tolist()
    predicted = predict(targets, loss_value, loss_scores, weights)
    return Selection(indices, weights, predicted, trace, int(eligible.sum()), test)


def predict(
    targets: Sequence[FairnessTarget],
    loss_value: float,
    loss_scores: torch.Tensor,
    weights: torch.Tensor,
) -> dict[str, float]:
    """Each target's value before and as predicted after removing `weights` of the samples."""
    predicted = {}
    for target in targets:
        predicted[f"{target.label}:before"] = target.exact(torch.zeros_like(target.values))
        predicted[f"{target.label}:after"] = target.exact(weights @ target.scores)
    predicted["valid_loss:before"] = loss_value
    predicted["valid_loss:after"] = loss_value + float(weights @ loss_scores)
    predicted["removed"] = float(weights.sum())
    return predicted


def _eps(target: FairnessTarget, config: MaskConfig) -> float:
    scale = float((target.values - target.reference).abs().max())
    return max(config.smoothing * scale, 1e-9)


def _fairness(
    mask: torch.Tensor,
    targets: Sequence[FairnessTarget],
    initial: dict[str, torch.Tensor],
    config: MaskConfig,
) -> torch.Tensor:
    return sum(
        t.weight * t.evaluate(mask @ t.scores, _eps(t, config)) / initial[t.label].clamp(min=1e-12)
        for t in targets
    )


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


def _eligible(
    targets: Sequence[FairnessTarget],
    config: MaskConfig,
    user_marginals: torch.Tensor | None,
) -> tuple[torch.Tensor, float]:
    """Which samples' marginal effects on the fairness terms at m = 0 are significantly
    helpful (Benjamini-Hochberg at `config.fdr`), and the spread σ of the marginals.

    With `user_marginals`: a one-sided t-test of each sample's mean over users. Without:
    robust z-scores against the other samples — median and MAD rather than mean and
    standard deviation, so that a block of truly harmful samples does not hide itself by
    inflating the noise estimate.
    """
    marginal = sum(
        target.scores @ gradient
        for target, gradient in zip(targets, fairness_gradient(targets, config), strict=True)
    )
    center = marginal.median()
    noise = max(1.4826 * float((marginal - center).abs().median()), 1e-12)
    if _tests_users(user_marginals):
        z_scores = _t_as_z(user_marginals.double())
    else:
        z_scores = (marginal - center) / noise
    p_values = torch.special.ndtr(z_scores)  # small: removal helps
    n = marginal.numel()
    order = torch.argsort(p_values)
    thresholds = config.fdr * torch.arange(1, n + 1, dtype=torch.float64) / n
    passing = torch.nonzero((p_values[order] <= thresholds) & (marginal[order] < 0)).flatten()
    eligible = torch.zeros(n, dtype=torch.bool)
    if passing.numel():
        eligible[order[: int(passing.max()) + 1]] = True
    return eligible & (marginal < 0), noise


def _tests_users(user_marginals: torch.Tensor | None) -> bool:
    """A t-test needs a few users (ν = U - 1 >= 2)."""
    return user_marginals is not None and user_marginals.size(1) >= 3


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


def _objective(
    mask: torch.Tensor,
    targets: Sequence[FairnessTarget],
    initial: dict[str, torch.Tensor],
    loss_value: float,
    loss_scores: torch.Tensor,
    config: MaskConfig,
    sparsity: float,
) -> torch.Tensor:
    loss_increase = torch.relu(mask @ loss_scores) / max(abs(loss_value), 1e-12)
    fairness = _fairness(mask, targets, initial, config)
    return fairness + config.alpha * loss_increase + sparsity * mask.sum()


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


def _round(
    soft: torch.Tensor,
    gradient: torch.Tensor,
    targets: Sequence[FairnessTarget],
    initial: dict[str, torch.Tensor],
    loss_value: float,
    loss_scores: torch.Tensor,
    config: MaskConfig,
    sparsity: float,
) -> torch.Tensor:
    """The best binary mask met while adding the samples in order of their soft weight
    (ties: the most helpful first), skipping any sample that would break the loss budget.
    Thresholding a fractional optimum can overshoot badly; the scan keeps the loss budget
    and cannot end worse than removing nothing."""
    ranking = sorted(range(soft.numel()), key=lambda i: (-float(soft[i]), float(gradient[i])))
    budget = max(1, int(config.max_fraction * soft.numel()))
    candidates = [i for i in ranking if soft[i] > 0][:budget]
    allowed = config.max_loss_increase * abs(loss_value)
    chosen = torch.zeros_like(soft)
    best = chosen.clone()
    best_value = _objective(
        chosen, targets, initial, loss_value, loss_scores, config, sparsity
    ).item()
    for index in candidates:
        chosen[index] = 1.0
        if float(chosen @ loss_scores) > allowed:
            chosen[index] = 0.0  # a later, cheaper sample may still fit
            continue
        value = _objective(
            chosen, targets, initial, loss_value, loss_scores, config, sparsity
        ).item()
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
    """Keep the `max_fraction` highest-mask samples, then drop the samples that cost the most
    validation loss until the predicted increase is within `max_loss_increase`."""
    weights = weights.clone()
    limit = int(config.max_fraction * weights.numel())
    chosen = torch.nonzero(weights).flatten()
    if chosen.numel() > limit:
        keep = chosen[torch.argsort(mask[chosen], descending=True)[:limit]]
        trimmed = torch.zeros_like(weights)
        trimmed[keep] = weights[keep]
        weights = trimmed
    allowed = config.max_loss_increase * abs(loss_value)
    chosen = torch.nonzero(weights).flatten()
    for index in chosen[torch.argsort(loss_scores[chosen], descending=True)].tolist():
        if float(weights @ loss_scores) <= allowed:
            break
        weights[index] = 0.0
    return weights
