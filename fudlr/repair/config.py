"""What a debias job is asked to do, checked without loading torch or a model.

The service validates job requests with these same objects in its request path, where
torch is never imported; the pipeline then runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from fudlr.data.bundle import Bundle, subset
from fudlr.data.schema import SampleRow
from fudlr.errors import InputError
from fudlr.fairness.groups import Groups
from fudlr.influence.projection import Projection
from fudlr.recommender.recommend import Decoding, RecommendConfig, check_decodable
from fudlr.repair.spec import BiasSpec

ELIGIBILITY = ("selection", "samples")


@dataclass(frozen=True)
class MaskConfig:
    """Mask learning options.

    alpha: weight of the predicted validation-loss increase (relative to the loss).
    eligibility: how the mask tells a bias from the queries' noise. "selection" (default):
    every sample whose marginal effect helps is a candidate, and the selection is kept only
    if one of its size, chosen on half of the query users, beats as many random samples on
    the other half (a cross-fitted one-sided t-test at level `fdr`): its power grows with
    the selection, so a bias spread thinly over many samples is found. "samples": a sample
    is a candidate only if its own effect is significantly helpful (a t-test over the query
    users per sample, Benjamini-Hochberg at false discovery rate `fdr`).
    fdr: the level of the eligibility test.
    beta: sparsity: removing an eligible sample costs beta times that noise level, so the
    mask stops adding samples whose help has faded. steps: Frank-Wolfe iterations.
    binarize: keep samples with m > 0.5 at weight 1, or keep soft weights.
    max_fraction: most training samples removed (or reinforced). max_loss_increase: largest
    predicted relative increase of the validation loss the selection may cause.
    smoothing: scale of the smoothed |x| and max, relative to each target's initial size.
    max_upweight: how far a sample may also be *reinforced*: weight down to -max_upweight,
    i.e. counted up to max_upweight more times (0 = removal only). Removal can only move
    recommendations away from an over-served group, and they go where the model's next
    choice lies; a group the model never recommends is reached by reinforcing the samples
    that teach it (the influence-guided form of reweighting the training set).
    """

    alpha: float = 1.0
    eligibility: str = "selection"
    fdr: float = 0.05
    beta: float = 0.5
    steps: int = 200
    binarize: bool = True
    max_fraction: float = 0.2
    max_loss_increase: float = 0.02
    smoothing: float = 0.01
    max_upweight: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.fdr < 1:
            raise InputError("fdr must be in (0, 1)")
        if self.eligibility not in ELIGIBILITY:
            raise InputError(
                f"eligibility must be one of {', '.join(ELIGIBILITY)}, not {self.eligibility!r}",
                field="eligibility",
            )
        if not 0 < self.max_fraction <= 1:
            raise InputError("max_fraction must be in (0, 1]")
        if min(self.alpha, self.beta, self.max_loss_increase, self.smoothing) < 0:
            raise InputError("alpha, beta, max_loss_increase and smoothing must not be negative")
        if self.max_upweight < 0:
            raise InputError("max_upweight must not be negative")
        if self.steps < 1:
            raise InputError("steps must be at least 1")


# η = 1 is the full removal; a step that moves few samples can still be far outside the
# region where the recommender is linear in the weights, so the search goes down to 1/64
STEP_SIZES = (1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 32, 1 / 64)
RANDOM_CONTROL = ("off", "report", "require")
# the K every measurement reports besides the biases' own (within the lists' length)
REPORTED_KS = (1, 5, 10)


@dataclass(frozen=True)
class DebiasConfig:
    """A debias job.

    query_users: validation users whose surrogates define the fairness and accuracy
    queries. pool_per_group: items scored per user and stratum (item biases).
    anchored_pools: put the items each query user's beams ground to (its recommendation
    and the num_beams - 1 runners-up) in its pool, so the surrogate sees the titles the
    model actually recommends or nearly does.
    temperature: of the surrogate's recommendation distribution; None = calibrated per job,
    the one at which the surrogate's shares best match the query users' measured GP@K.
    guard_users: validation users on which the guard measures the hard metrics (None =
    all). max_ndcg_drop: the accuracy budget, the largest relative drop of NDCG@accuracy_k
    the guard accepts: a step is refused when the drop exceeds it in at least
    guard_confidence of the bootstrap resamples. guard_confidence: the guard accepts a
    step only if, in a paired bootstrap over the guard users, the bias went down in at
    least this fraction of resamples (0 = any measured reduction, and any measured drop
    beyond the budget refuses). step_sizes: η tried in order. guard_tries: how many of
    them the guard measures: the step sizes are first
    ranked by the hard bias change on the query users (decoded at θ + ηΔθ), and the guard
    confirms only the best `guard_tries` that improve there, on its own users.
    step_patience: stop trying step sizes after this many in a row that do no better on
    the query users than the best one before them (None: try them all).
    random_control: the same Newton step at the same η from as many random training
    samples (same weights), measured on the guard users: whether the selection or any step
    of that size moved the bias. "require" (default): the guard accepts a step only if the
    selection beats it (paired bootstrap, `guard_confidence`; one more decoding per step the
    guard would otherwise accept); "report": measured after acceptance, not judged; "off".
    max_other_k_increase: largest relative increase of each bias at the other reported K
    (1, 5, 10) the guard accepts; None: measured and reported, not judged.
    accuracy_k: K of the NDCG the guard checks, whatever the biases' K (at most the
    catalog's size). max_ndcg_drop is judged on it in the bias's paired bootstrap.
    drop_unmeasurable: a bias the guard users cannot measure (a user group with none of
    them or with no hit among them, an item group absent from their histories) fails the
    job up front; with this, the job runs on the others and reports the dropped ones.
    test_users: test users measured before and after (None = all, 0 = skip the test split).
    projection: the gradient projection the job expects its index to store (None: whatever
    it stores); an index built with another one is refused, not silently used.
    """

    biases: tuple[BiasSpec, ...]
    mask: MaskConfig = field(default_factory=MaskConfig)
    query_users: int | None = 128
    pool_per_group: int = 4
    anchored_pools: bool = True
    temperature: float | None = None
    guard_users: int | None = 256
    max_ndcg_drop: float = 0.05
    guard_confidence: float = 0.8
    step_sizes: tuple[float, ...] = STEP_SIZES
    guard_tries: int = 3
    step_patience: int | None = 2
    random_control: str = "require"
    max_other_k_increase: float | None = None
    accuracy_k: int = 10
    drop_unmeasurable: bool = False
    test_users: int | None = None
    projection: Projection | None = None
    recommend: RecommendConfig = field(default_factory=RecommendConfig)
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.biases:
            raise InputError("a debias job needs at least one bias")
        check_distinct(self.biases)
        if not self.step_sizes or any(not 0 < eta <= 4 for eta in self.step_sizes):
            raise InputError("step sizes must be in (0, 4]")
        if self.step_patience is not None and self.step_patience < 1:
            raise InputError("step_patience must be at least 1")
        if self.guard_tries < 1:
            raise InputError("guard_tries must be at least 1")
        if not 0 <= self.max_ndcg_drop < 1:
            raise InputError("max_ndcg_drop must be in [0, 1)")
        if self.accuracy_k < 1:
            raise InputError("accuracy_k must be at least 1", field="accuracy_k")
        if not 0 <= self.guard_confidence < 1:
            raise InputError("guard_confidence must be in [0, 1)")
        if self.max_other_k_increase is not None and self.max_other_k_increase < 0:
            raise InputError(
                "max_other_k_increase must not be negative", field="max_other_k_increase"
            )
        if self.random_control not in RANDOM_CONTROL:
            raise InputError(
                f"random_control must be one of {', '.join(RANDOM_CONTROL)}, "
                f"not {self.random_control!r}",
                field="random_control",
            )
        if (self.temperature is not None and self.temperature <= 0) or self.pool_per_group < 1:
            raise InputError("temperature must be positive and pool_per_group at least 1")
        deepest = max(self.accuracy_k, *REPORTED_KS, *(bias.k for bias in self.biases))
        if self.recommend.decoding == Decoding.CONSTRAINED and self.recommend.top is None:
            # constrained lists are as long as the deepest K measured, no longer: each
            # item costs beam search
            object.__setattr__(self, "recommend", replace(self.recommend, top=deepest))
        elif self.recommend.top is not None and self.recommend.top < deepest:
            raise InputError(
                f"recommendation lists of {self.recommend.top} items cannot measure "
                f"K = {deepest}; ask for at least {deepest} (top)",
                field="top",
            )


def default(name: str) -> Any:
    """A DebiasConfig field's default, for the CLI's and the API's options to share."""
    return next(item.default for item in fields(DebiasConfig) if item.name == name)


def check_projection(stored: Projection, asked: Projection | None) -> None:
    """Refuse a job that expects its index to store another projection than it does."""
    if asked is not None and asked != stored:
        raise InputError(
            f"the training-set index stores {stored} gradients but the job asks for {asked}; "
            f"rebuild the index with projection {asked}, or leave the job's projection unset",
            field="projection",
        )


def check_distinct(biases: Sequence[BiasSpec]) -> None:
    """A job names each bias once (the report keys everything by its label)."""
    labels = [bias.label for bias in biases]
    if len(set(labels)) != len(labels):
        raise InputError(f"the same bias is given twice: {', '.join(labels)}", field="biases")


def guard_subset(bundle: Bundle, config: DebiasConfig) -> list[SampleRow]:
    """The validation users the guard measures (the same wherever the job is checked)."""
    return subset(bundle.split("valid"), config.guard_users, config.seed + 1)


class UnmeasurableBias(InputError):
    """Biases the guard users cannot measure, with why (`reasons`: label -> reason);
    `position`: the first one's index among the job's biases. No compute can repair or
    judge a bias without signal, so the job fails before any."""

    def __init__(self, reasons: dict[str, str], position: int, remaining: bool) -> None:
        self.reasons, self.position = reasons, position
        named = "; ".join(
            f"bias {label} cannot be measured: {why}" for label, why in reasons.items()
        )
        hint = (
            " (drop_unmeasurable, --drop-unmeasurable, runs the job on the other biases)"
            if remaining
            else " (no other bias is left to run)"
        )
        super().__init__(named + hint)


def unmeasurable_in_data(
    bundle: Bundle, config: DebiasConfig, groups: dict[str, Groups]
) -> dict[str, str]:
    """Biases (label -> why) the guard users' data cannot measure, before any decoding: a
    user group with none of them (its utility is undefined), an item group absent from
    their histories (GH = 0: no share of the histories for its recommendations to match)."""
    rows = guard_subset(bundle, config)
    reasons = {}
    for bias in config.biases:
        of = groups[bias.label]
        if bias.side == "user":
            present = {name for row in rows for name in of.of(row.user_id)}
            missing = [name for name in of.names if name not in present]
            problem = f"user group(s) {', '.join(missing)} have none of the {len(rows)} guard users"
        else:
            present = {name for row in rows for item in row.history for name in of.of(item)}
            missing = [name for name in of.names if name not in present]
            problem = (
                f"item group(s) {', '.join(missing)} are absent from the {len(rows)} guard "
                "users' histories (GH = 0)"
            )
        if missing:
            reasons[bias.label] = problem
    return reasons


def screened(
    config: DebiasConfig, reasons: dict[str, str]
) -> tuple[DebiasConfig, list[dict[str, str]]]:
    """The job on the biases that can be measured, and the dropped ones with why
    ({"bias", "reason"}); raises UnmeasurableBias unless the job may drop them and one
    remains."""
    if not reasons:
        return config, []
    kept = tuple(bias for bias in config.biases if bias.label not in reasons)
    if not config.drop_unmeasurable or not kept:
        labels = [bias.label for bias in config.biases]
        position = min(labels.index(label) for label in reasons)
        raise UnmeasurableBias(reasons, position, remaining=bool(kept))
    dropped = [{"bias": label, "reason": why} for label, why in reasons.items()]
    return replace(config, biases=kept), dropped


def check_job(
    bundle: Bundle, config: DebiasConfig
) -> tuple[dict[str, Groups], DebiasConfig, list[dict[str, str]]]:
    """Every check that needs no model: specs against the bundle, the splits it uses, and
    whether the guard users' data can measure each bias (refused, or dropped where the
    job allows). The groups of every bias, the job on the biases kept, the dropped ones."""
    for split in ("train", "valid"):
        if not bundle.split(split):
            raise InputError(f"the {split} split is empty", file=bundle.root / f"{split}.jsonl")
    if config.test_users != 0 and not bundle.split("test"):
        raise InputError("the test split is empty", file=bundle.root / "test.jsonl")
    if config.accuracy_k > len(bundle.items):
        raise InputError(
            f"accuracy_k={config.accuracy_k} is larger than the catalog ({len(bundle.items)})",
            field="accuracy_k",
        )
    groups = {bias.label: bias.groups(bundle, "valid") for bias in config.biases}
    check_decodable(bundle, config.recommend)
    return groups, *screened(config, unmeasurable_in_data(bundle, config, groups))
