"""What a debias job is asked to do, checked without loading torch or a model.

The service validates job requests with these same objects in its request path, where
torch is never imported; the pipeline then runs them. Each setting's default, bounds and
help are declared on its field (fudlr/setting.py): SETTINGS names them for the API's
fields and the command lines' options, and job_config builds a job from them by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from fudlr.data.bundle import Bundle, subset
from fudlr.data.schema import SampleRow
from fudlr.errors import InputError
from fudlr.fairness.groups import Groups
from fudlr.influence.projection import Projection
from fudlr.recommender.recommend import Decoding, RecommendConfig, check_decodable
from fudlr.repair.spec import BiasSpec
from fudlr.setting import check, declared, setting

Eligibility = Literal["selection", "samples"]
ELIGIBILITY: tuple[str, ...] = get_args(Eligibility)


@dataclass(frozen=True)
class MaskConfig:
    """Mask learning options; each field's `setting` says what it does.

    Eligibility is how the mask tells a bias from the queries' noise. "selection": every
    sample whose marginal effect helps is a candidate, and the selection is kept only if
    one of its size, chosen on half of the query users, beats as many random samples on
    the other half (a cross-fitted one-sided t-test at level `fdr`): its power grows with
    the selection, so a bias spread thinly over many samples is found. "samples": a sample
    is a candidate only if its own effect is significantly helpful (a t-test over the query
    users per sample, Benjamini-Hochberg at false discovery rate `fdr`).

    Reinforcing (max_upweight > 0): removal can only move recommendations away from an
    over-served group, and they go where the model's next choice lies; a group the model
    never recommends is reached by reinforcing the samples that teach it (the
    influence-guided form of reweighting the training set).
    """

    alpha: float = field(
        default=1.0,
        metadata=setting(
            "Weight of the predicted validation-loss increase, relative to the loss", ge=0
        ),
    )
    eligibility: Eligibility = field(
        default="selection",
        metadata=setting(
            "How a bias is told from noise: selection (the selection must beat as many "
            "random samples on held-out query users) or samples (each sample's own effect "
            "must be significant, Benjamini-Hochberg)",
            choices=ELIGIBILITY,
        ),
    )
    fdr: float = field(
        default=0.05,
        metadata=setting("Level of the eligibility test (higher: more samples)", gt=0, lt=1),
    )
    beta: float = field(
        default=0.5,
        metadata=setting(
            "Sparsity: removing an eligible sample costs beta times the queries' noise "
            "level, so the mask stops adding samples whose help has faded",
            ge=0,
        ),
    )
    steps: int = field(default=200, metadata=setting("Frank-Wolfe iterations", ge=1))
    binarize: bool = field(
        default=True,
        metadata=setting("Keep the samples weighted above 0.5 at weight 1, not soft weights"),
    )
    max_fraction: float = field(
        default=0.2,
        metadata=setting(
            "Most training samples unlearned (removed or reinforced), as a fraction", gt=0, le=1
        ),
    )
    max_loss_increase: float = field(
        default=0.02,
        metadata=setting(
            "Largest predicted relative increase of the validation loss the selection may cause",
            ge=0,
        ),
    )
    smoothing: float = field(
        default=0.01,
        metadata=setting(
            "Scale of the smoothed |x| and max, relative to each target's initial size", ge=0
        ),
    )
    max_upweight: float = field(
        default=0.0,
        metadata=setting(
            "Samples may also be reinforced, counted up to this many more times (0: removal only)",
            ge=0,
        ),
    )

    def __post_init__(self) -> None:
        check(self)


# η = 1 is the full removal; a step that moves few samples can still be far outside the
# region where the recommender is linear in the weights, so the search goes down to 1/64
STEP_SIZES = (1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 32, 1 / 64)
RandomControl = Literal["off", "report", "require"]
RANDOM_CONTROL: tuple[str, ...] = get_args(RandomControl)
# the K every measurement reports besides the biases' own (within the lists' length)
REPORTED_KS = (1, 5, 10)


@dataclass(frozen=True)
class DebiasConfig:
    """A debias job: the biases, and settings whose `setting` says what each does.

    The guard judges each step on its own users: the step sizes are first ranked by the
    hard bias change on the query users (decoded at θ + ηΔθ), and the guard confirms only
    the best `guard_tries` that improve there; a step is published when the bias went
    down, accuracy stayed within its budget and, under random_control "require", the
    selection beat as many random samples.
    """

    biases: tuple[BiasSpec, ...]
    mask: MaskConfig = field(default_factory=MaskConfig)
    query_users: int | None = field(
        default=128,
        metadata=setting(
            "Validation users whose surrogates define the fairness and accuracy queries "
            "(unset: all)",
            ge=1,
        ),
    )
    pool_per_group: int = field(
        default=4, metadata=setting("Items scored per user and group (item biases)", ge=1)
    )
    anchored_pools: bool = field(
        default=True,
        metadata=setting(
            "Put the items each query user's beams ground to (its recommendation and the "
            "runners-up) in its pool, so the surrogate sees the titles the model recommends "
            "or nearly does"
        ),
    )
    temperature: float | None = field(
        default=None,
        metadata=setting(
            "Of the surrogate's recommendation distribution (unset: calibrated per job, the "
            "one at which the surrogate's shares best match the query users' measured GP@K)",
            gt=0,
        ),
    )
    guard_users: int | None = field(
        default=256,
        metadata=setting(
            "Validation users on which the guard measures the hard metrics (unset: all)", ge=1
        ),
    )
    max_ndcg_drop: float = field(
        default=0.05,
        metadata=setting(
            "The accuracy budget: the largest relative drop of NDCG@accuracy_k the guard "
            "accepts; a step is refused when the drop exceeds it in at least "
            "guard_confidence of the bootstrap resamples of the guard users",
            ge=0,
            lt=1,
        ),
    )
    guard_confidence: float = field(
        default=0.8,
        metadata=setting(
            "Share of paired bootstrap resamples of the guard users in which the bias must "
            "go down for a step to be published (0: any measured reduction, and any "
            "measured accuracy drop beyond the budget refuses)",
            ge=0,
            lt=1,
        ),
    )
    step_sizes: tuple[float, ...] = field(
        default=STEP_SIZES,
        metadata=setting(
            "Step sizes η tried, each in (0, 4] (1: the full removal), ranked by the bias "
            "change on the query users"
        ),
    )
    guard_tries: int = field(
        default=3,
        metadata=setting(
            "How many of the best step sizes on the query users the guard confirms", ge=1
        ),
    )
    step_patience: int | None = field(
        default=2,
        metadata=setting(
            "Stop trying step sizes after this many in a row that do no better on the query "
            "users than the best before them (unset: try them all)",
            ge=1,
        ),
    )
    random_control: RandomControl = field(
        default="require",
        metadata=setting(
            "The same step from as many random training samples, on the guard users: "
            "require (the selection must beat it, one more decoding per accepted step), "
            "report (measured, not judged) or off",
            choices=RANDOM_CONTROL,
        ),
    )
    max_other_k_increase: float | None = field(
        default=None,
        metadata=setting(
            "Largest relative increase of each bias at the other reported K (1, 5, 10) the "
            "guard accepts (unset: measured and reported, not judged)",
            ge=0,
        ),
    )
    accuracy_k: int = field(
        default=10,
        metadata=setting(
            "K of the NDCG the guard checks, whatever the biases' K (at most the catalog's size)",
            ge=1,
        ),
    )
    drop_unmeasurable: bool = field(
        default=False,
        metadata=setting(
            "Run on the biases the guard users can measure and report the others, instead "
            "of failing the job (a user group with none of them or no hit among them, an "
            "item group absent from their histories)"
        ),
    )
    test_users: int | None = field(
        default=None,
        metadata=setting(
            "Test users measured before and after (unset: all; 0 skips the test split)", ge=0
        ),
    )
    projection: Projection | None = field(
        default=None,
        metadata=setting(
            "The gradient projection the training-set index must store, eigenbasis or dense "
            "(unset: whatever it stores); an index built with another is refused"
        ),
    )
    recommend: RecommendConfig = field(default_factory=RecommendConfig)
    max_length: int = field(
        default=256, metadata=setting("Tokens kept of a sample's prompt and answer", ge=1)
    )
    batch_size: int = field(
        default=8, metadata=setting("Samples per batch of gradient passes", ge=1)
    )
    seed: int = field(
        default=0,
        metadata=setting("Seed of the query and guard users' draws and the random control"),
    )

    def __post_init__(self) -> None:
        if not self.biases:
            raise InputError("a debias job needs at least one bias")
        check_distinct(self.biases)
        check(self)
        check_step_sizes(self.step_sizes)
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


# every setting of a job by name, one flat namespace: the API's budget and options and the
# command lines' flags are these names
SETTINGS = declared(MaskConfig, DebiasConfig, RecommendConfig)


def job_config(biases: Sequence[BiasSpec], values: Mapping[str, Any]) -> DebiasConfig:
    """A debias job from settings by name (the API's budget and options, `fudlr debias`'s
    flags): each goes to the config that declares it; a setting not given keeps its
    default."""
    parts: dict[type, dict[str, Any]] = {MaskConfig: {}, RecommendConfig: {}, DebiasConfig: {}}
    for name, value in values.items():
        parts[SETTINGS[name].owner][name] = value
    return DebiasConfig(
        biases=tuple(biases),
        mask=MaskConfig(**parts[MaskConfig]),
        recommend=RecommendConfig(**parts[RecommendConfig]),
        **parts[DebiasConfig],
    )


def check_step_sizes(sizes: Sequence[float]) -> None:
    """At least one step size, each toward the removal and at most 4 times it: beyond,
    the recommender is far from linear in the weights."""
    if not sizes or any(not 0 < eta <= 4 for eta in sizes):
        raise InputError("step sizes must be in (0, 4]", field="step_sizes")


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
