"""Hard metrics of a (patched) recommender on a set of users, and the guard's verdict.

The guard is the last word: predictions choose the samples, but an adapter is published
only if beam search + grounding on held-out users shows the bias went down and accuracy
stayed within the job's tolerance. Both are judged against the guard users' own noise, in
the same paired bootstrap over users: a step is accepted only if the probability that the
bias did not go down is at most 1 - `confidence`, and refused for accuracy only if the
NDCG drop exceeds its budget in at least `confidence` of the resamples (a guardrail: it
refuses when it is confident of harm). A few hundred users leave a lot of noise in a
group share and a handful of hits, and trying several step sizes on the same users would
otherwise publish chance improvements or refuse on one user's lost hit. And a reduction
is the selection's only if it beats the same step taken from as many random samples
(`beats_control`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

from fudlr.data.bundle import Bundle
from fudlr.data.schema import SampleRow
from fudlr.fairness.bootstrap import resampled_users
from fudlr.fairness.metrics import evaluate, hit_at_k, ndcg_at_k
from fudlr.recommender.recommend import RecommendConfig, Recommender
from fudlr.repair.config import REPORTED_KS
from fudlr.repair.spec import BiasSpec


@dataclass
class Measurement:
    """Each bias's hard metric and per-group numbers, accuracy at `k`, the full reports,
    each user's top list (as long as the largest K measured) for the bootstrap, and each
    bias's metric at every K measured (`biases_at_k`: label -> K -> value)."""

    biases: dict[str, float]
    groups: dict[str, dict]
    ndcg: float
    hr: float
    k: int
    exact_matches: int
    reports: dict[str, dict]
    top_lists: dict[str, list[str]]
    biases_at_k: dict[str, dict[str, float]]

    def shares(self, item_attribute: str, k: int) -> dict[str, float]:
        """GP@K per item group of `item_attribute` (from the report that grouped by it)."""
        report = next(r for key, r in self.reports.items() if key.startswith(f"{item_attribute}|"))
        return report["k"][str(k)]["GP"]

    def summary(self) -> dict:
        return {
            "biases": self.biases,
            "biases_at_k": self.biases_at_k,
            "groups": self.groups,
            f"NDCG@{self.k}": self.ndcg,
            f"HR@{self.k}": self.hr,
            "exact_title_generations": self.exact_matches,
            "users": next(iter(self.reports.values()))["users"],
        }


MEASUREMENT_FORMAT = 4  # 2: with each user's top list; 3: every bias at REPORTED_KS;
# 4: beams attend to one copy of their prompt (bf16 lists may differ from 3's at near-ties)


def measurement_key(
    digests: Sequence[str],
    split: str,
    rows: Sequence[SampleRow],
    biases: Sequence[BiasSpec],
    accuracy_k: int,
    config: RecommendConfig,
) -> str:
    """What a measurement of the *unpatched* adapter depends on (digests of the base model,
    the adapter and the bundle, the rows, the metrics, the decoding); equal keys, equal results."""
    parts = [
        MEASUREMENT_FORMAT,
        list(digests),
        split,
        [row.sample_id for row in rows],
        [bias.label for bias in biases],
        accuracy_k,
        asdict(config),
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cached_measure(cache: Path, key: str, compute) -> Measurement:
    """The original adapter's measurement is the same for every job on it: keep it on disk."""
    path = cache / f"{key}.json"
    if path.is_file():
        return Measurement(**json.loads(path.read_text()))
    measurement = compute()
    cache.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(measurement)))
    temporary.replace(path)
    return measurement


def measure(
    recommender: Recommender,
    bundle: Bundle,
    split: str,
    rows: Sequence[SampleRow],
    biases: Sequence[BiasSpec],
    accuracy_k: int,
    config: RecommendConfig,
) -> Measurement:
    """Recommend for `rows` with the recommender's current weights and score every bias."""
    ranked = recommender.rank(rows, config)
    return measurement_of(
        bundle, split, rows, ranked.by_user(rows), biases, accuracy_k, ranked.exact_matches
    )


def measurement_of(
    bundle: Bundle,
    split: str,
    rows: Sequence[SampleRow],
    rankings: dict[str, Sequence[str]],
    biases: Sequence[BiasSpec],
    accuracy_k: int,
    exact_matches: int,
) -> Measurement:
    """Every bias's hard metric and accuracy of given rankings (user id -> items, best first)."""
    shortest = min(len(ranking) for ranking in rankings.values())
    ks = sorted({accuracy_k, *(b.k for b in biases), *(k for k in REPORTED_KS if k <= shortest)})
    top_lists = {user: list(ranking[: ks[-1]]) for user, ranking in rankings.items()}
    reports = _reports(bundle, split, rows, top_lists, biases, ks)
    values, groups = _bias_values(reports, biases), {}
    for bias in biases:
        at_k = _at_k(reports, bias, biases)
        if bias.side == "item":
            groups[bias.label] = {"GP": at_k["GP"], "GH": at_k["GH"], "GU": at_k["GU"]}
        else:
            groups[bias.label] = {"NDCG": at_k["user_gap"]["groups"]}
    accuracy = next(iter(reports.values()))["k"][str(accuracy_k)]
    at_k = {
        bias.label: {str(k): _bias_value(reports, bias, biases, k) for k in ks} for bias in biases
    }
    return Measurement(
        values,
        groups,
        accuracy["NDCG"],
        accuracy["HR"],
        accuracy_k,
        exact_matches,
        reports,
        top_lists,
        at_k,
    )


def _report_key(bias: BiasSpec, biases: Sequence[BiasSpec]) -> str:
    """ "item attribute|user attribute" of the report that scores `bias` (the other side's
    attribute: the first one the job names, else the defaults)."""
    item = next((b.attribute for b in biases if b.side == "item"), "popularity_group")
    user = next((b.attribute for b in biases if b.side == "user"), "gender")
    if bias.side == "item":
        return f"{bias.attribute}|{user}"
    return f"{item}|{bias.attribute}"


def _reports(
    bundle: Bundle,
    split: str,
    rows: Sequence[SampleRow],
    top_lists: dict[str, list[str]],
    biases: Sequence[BiasSpec],
    ks: Sequence[int],
) -> dict[str, dict]:
    """One metrics report per (item attribute, user attribute) pair the biases need (at least
    one, for accuracy). Repeated rows count repeatedly: a bootstrap resample."""
    keys = list(dict.fromkeys(_report_key(bias, biases) for bias in biases))
    keys = keys or ["popularity_group|gender"]
    reports = {}
    for key in keys:
        item_attribute, user_attribute = key.split("|")
        reports[key] = evaluate(
            bundle, split, top_lists, ks, item_attribute, user_attribute, rows=rows
        )
    return reports


def _at_k(reports: dict[str, dict], bias: BiasSpec, biases: Sequence[BiasSpec]) -> dict:
    """The metrics at the bias's K from the report that scores it."""
    return reports[_report_key(bias, biases)]["k"][str(bias.k)]


def _bias_values(reports: dict[str, dict], biases: Sequence[BiasSpec]) -> dict[str, float]:
    """Each bias's hard metric at its K."""
    return {bias.label: _bias_value(reports, bias, biases, bias.k) for bias in biases}


def _bias_value(
    reports: dict[str, dict], bias: BiasSpec, biases: Sequence[BiasSpec], k: int
) -> float:
    """A bias's metric at K: MGU/DGU of its item groups, or its user groups' NDCG gap."""
    at_k = reports[_report_key(bias, biases)]["k"][str(k)]
    return at_k[bias.metric] if bias.side == "item" else at_k["user_gap"]["NDCG"]


def bias_change(before: dict[str, float], after: dict[str, float], biases: Sequence[BiasSpec]):
    """The weighted mean of the biases' relative changes (< 0: fairer)."""
    return sum(
        bias.weight * (after[bias.label] - before[bias.label]) / max(abs(before[bias.label]), 1e-12)
        for bias in biases
    ) / sum(bias.weight for bias in biases)


def bootstrap_no_reduction(
    bundle: Bundle,
    split: str,
    rows: Sequence[SampleRow],
    before: Measurement,
    after: Measurement,
    biases: Sequence[BiasSpec],
    seed: int = 0,
    resamples: int = 200,
) -> float:
    """The fraction of paired bootstrap resamples of the users (the same resample before and
    after) in which the weighted bias change is not negative."""
    ks = sorted({bias.k for bias in biases})  # the bootstrap judges the biases at their K
    not_reduced = 0
    for resampled in resampled_users(rows, seed, resamples):
        values = [
            _bias_values(_reports(bundle, split, resampled, m.top_lists, biases, ks), biases)
            for m in (before, after)
        ]
        not_reduced += bias_change(*values, biases) >= 0
    return not_reduced / resamples


def ndcg_drop(before: Measurement, after: Measurement) -> float:
    """The relative NDCG drop (> 0: less accurate; 0 where there was no accuracy to lose)."""
    return (before.ndcg - after.ndcg) / before.ndcg if before.ndcg > 0 else 0.0


# the central share of the resampled NDCG drops an accuracy check reports as its interval
ACCURACY_INTERVAL = 0.9


@dataclass(frozen=True)
class AccuracyCheck:
    """NDCG@`k` of the guard users before and after a step, the relative drop (> 0: less
    accurate), its paired bootstrap interval [`low`, `high`] (`ACCURACY_INTERVAL`), the
    share of resamples in which the drop exceeds `budget` (`p_over_budget`), the guard
    users' hits before, and whether they can resolve the budget at all (`resolved`, see
    `resolves`)."""

    k: int
    before: float
    after: float
    drop: float
    low: float
    high: float
    p_over_budget: float
    budget: float
    hits_before: int
    resolved: bool

    def refuses(self, confidence: float) -> bool:
        """Confident of harm: the drop exceeds the budget, and does so in at least
        `confidence` of the resamples (0: the measured drop alone decides)."""
        return self.drop > self.budget and self.p_over_budget >= confidence

    def describe(self) -> dict[str, float | int | bool]:
        return asdict(self)

    def explain(self) -> str:
        """One phrase for the verdict and the CLI: the drop, its interval and its noise."""
        text = (
            f"NDCG@{self.k} drop {self.drop:+.1%} ({ACCURACY_INTERVAL:.0%} interval "
            f"[{self.low:+.1%}, {self.high:+.1%}], P(> {self.budget:.0%} budget) "
            f"{self.p_over_budget:.2f})"
        )
        if not self.resolved:
            text += (
                f"; the accuracy budget is unresolved: {self.hits_before} hit(s) before are "
                f"too few to tell a {self.budget:.0%} drop of NDCG@{self.k} from noise"
            )
        return text


def resolves(hits: int, budget: float, confidence: float) -> bool:
    """Whether `hits` (the guard users' hits before) can resolve a relative `budget`: one
    lost hit stays within it, and losing twice the budget's worth of hits would be refused
    at `confidence`. A step that loses L of h hits leaves about L ± sqrt(L) lost in a
    resample, so it is refused when L - z·sqrt(L) ≥ budget·h (z: the normal quantile of
    the confidence); at L = 2·budget·h that is budget·h ≥ 2z². With fewer hits the check
    can refuse only drops several times the budget, or a single user decides."""
    z = max(NormalDist().inv_cdf(confidence), 0.0) if confidence > 0 else 0.0
    return hits * budget >= max(1.0, 2 * z * z)


def accuracy_check(
    rows: Sequence[SampleRow],
    before: Measurement,
    after: Measurement,
    budget: float,
    confidence: float,
    seed: int = 0,
    resamples: int = 200,
) -> AccuracyCheck:
    """The relative NDCG drop at the measurements' accuracy K, judged in the paired
    bootstrap the bias is judged in (same seed, same resamples of the same users);
    `confidence` (the guard's) decides only whether the budget is resolved."""
    k = before.k

    def gains(measurement: Measurement) -> dict[str, float]:
        return {
            row.sample_id: ndcg_at_k(measurement.top_lists[row.user_id], row.target, k)
            for row in rows
        }

    was, now = gains(before), gains(after)
    drops = []
    for resampled in resampled_users(rows, seed, resamples):
        gained = sum(was[row.sample_id] for row in resampled)
        lost = gained - sum(now[row.sample_id] for row in resampled)
        drops.append(lost / gained if gained > 0 else 0.0)
    drops.sort()
    tail = (1 - ACCURACY_INTERVAL) / 2
    hits = sum(int(hit_at_k(before.top_lists[row.user_id], row.target, k)) for row in rows)
    total = sum(was.values())
    return AccuracyCheck(
        k=k,
        before=total / len(rows),
        after=sum(now.values()) / len(rows),
        drop=(total - sum(now.values())) / total if total > 0 else 0.0,
        low=drops[math.floor(tail * (resamples - 1))],
        high=drops[math.ceil((1 - tail) * (resamples - 1))],
        p_over_budget=sum(drop > budget for drop in drops) / resamples,
        budget=budget,
        hits_before=hits,
        resolved=resolves(hits, budget, confidence),
    )


def verdict(
    before: Measurement,
    after: Measurement,
    biases: Sequence[BiasSpec],
    accuracy: AccuracyCheck,
    no_reduction: float,
    confidence: float,
) -> tuple[bool, str]:
    """Accept when the weighted relative change of the biases is negative (fairer), the
    bootstrap probability `no_reduction` that it is not is at most 1 - `confidence`, and
    `accuracy` is not confident the NDCG drop exceeds its budget; say why otherwise."""
    change = bias_change(before.biases, after.biases, biases)
    noise = f"P(not reduced) {no_reduction:.2f}"
    if change >= 0:
        return False, f"bias not reduced (weighted relative change {change:+.1%}, {noise})"
    if no_reduction > 1 - confidence:
        return False, (
            f"bias change {change:+.1%} is within the guard users' noise "
            f"({noise} > {1 - confidence:.2f})"
        )
    if accuracy.refuses(confidence):
        return False, f"accuracy budget exceeded: {accuracy.explain()}, bias change {change:+.1%}"
    return True, f"bias change {change:+.1%} ({noise}), {accuracy.explain()}"


def unmeasured_utility(before: Measurement, biases: Sequence[BiasSpec]) -> dict[str, str]:
    """User biases (label -> why) with a group whose guard users all have NDCG@K = 0: its
    side of the gap has no signal, so the gap measures only the other groups, and a step
    could only be seen to close it by taking hits from them."""
    reasons = {}
    for bias in biases:
        if bias.side == "user":
            empty = [g for g, value in before.groups[bias.label]["NDCG"].items() if value == 0]
            if empty:
                reasons[bias.label] = (
                    f"user group(s) {', '.join(empty)} have NDCG@{bias.k} = 0 for every one of "
                    "their guard users (no hit to measure a gap by)"
                )
    return reasons


def other_k_check(
    before: Measurement, after: Measurement, biases: Sequence[BiasSpec], max_increase: float
) -> tuple[bool, str]:
    """Refuse a step that makes a bias worse at another reported K by more than
    `max_increase` (relative): a repair of MGU@5 that doubles MGU@1 is not one a user who
    shows top-1 and top-5 lists wants."""
    for bias in biases:
        was, now = before.biases_at_k[bias.label], after.biases_at_k[bias.label]
        for k in was:
            if int(k) == bias.k:
                continue
            increase = (now[k] - was[k]) / max(abs(was[k]), 1e-12)
            if increase > max_increase:
                return False, (
                    f"{bias.label} at K={k} rose {increase:+.1%} ({was[k]:.4f} -> {now[k]:.4f}; "
                    f"> {max_increase:.0%} allowed)"
                )
    return True, ""


def beats_control(
    before: Measurement,
    after: Measurement,
    control: Measurement,
    biases: Sequence[BiasSpec],
    not_better: float,
    confidence: float,
) -> tuple[bool, str]:
    """Accept when the selection's step (`after`) lowered the bias more than the same step
    from random samples (`control`), and the paired bootstrap probability `not_better` that
    it did not is at most 1 - `confidence`; say why otherwise. Without this, a step whose
    size alone moves the bias would be published as the selection's doing."""
    selected = bias_change(before.biases, after.biases, biases)
    random_samples = bias_change(before.biases, control.biases, biases)
    compared = (
        f"selection {selected:+.1%}, random samples {random_samples:+.1%}, "
        f"P(not better) {not_better:.2f}"
    )
    if bias_change(control.biases, after.biases, biases) >= 0:
        return False, f"the same step from random samples does as well ({compared})"
    if not_better > 1 - confidence:
        return False, (
            f"the selection's edge over random samples is within the guard users' noise "
            f"({compared} > {1 - confidence:.2f})"
        )
    return True, f"beats random samples ({compared})"
