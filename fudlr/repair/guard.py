"""Hard metrics of a (patched) recommender on a set of users, and the guard's verdict.

The guard is the last word: predictions choose the samples, but an adapter is published
only if beam search + grounding on held-out users shows the bias went down and accuracy
stayed within the job's tolerance. "Went down" is judged against the guard users' own
noise: a paired bootstrap over users gives the probability that the bias did not go down,
and a step is accepted only if that probability is at most 1 - `confidence`. A few hundred
users leave a lot of noise in a group share, and trying several step sizes on the same
users would otherwise publish chance improvements. And a reduction is the selection's
only if it beats the same step taken from as many random samples (`beats_control`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fudlr.data.bundle import Bundle
from fudlr.data.schema import SampleRow
from fudlr.fairness.metrics import evaluate
from fudlr.recommender.recommend import RecommendConfig, Recommender
from fudlr.repair.config import REPORTED_KS
from fudlr.repair.spec import BiasSpec

# every bias is also reported at these K (where the rankings are that long): a repair at
# one K can move the same bias the other way at another (an MGU@5 repair on SmolLM2 made
# MGU@1 58% worse), and the guard judges only the bias's own K


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


MEASUREMENT_FORMAT = 3  # 2: with each user's top list; 3: every bias at REPORTED_KS


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
    rng = random.Random(seed)
    not_reduced = 0
    for _ in range(resamples):
        resampled = rng.choices(rows, k=len(rows))
        values = [
            _bias_values(_reports(bundle, split, resampled, m.top_lists, biases, ks), biases)
            for m in (before, after)
        ]
        not_reduced += bias_change(*values, biases) >= 0
    return not_reduced / resamples


def ndcg_drop(before: Measurement, after: Measurement) -> float:
    """The relative NDCG drop (> 0: less accurate; 0 where there was no accuracy to lose)."""
    return (before.ndcg - after.ndcg) / before.ndcg if before.ndcg > 0 else 0.0


def verdict(
    before: Measurement,
    after: Measurement,
    biases: Sequence[BiasSpec],
    max_ndcg_drop: float,
    no_reduction: float,
    confidence: float,
) -> tuple[bool, str]:
    """Accept when the weighted relative change of the biases is negative (fairer), the
    bootstrap probability `no_reduction` that it is not is at most 1 - `confidence`, and the
    relative NDCG drop is within `max_ndcg_drop`; say why otherwise."""
    change = bias_change(before.biases, after.biases, biases)
    drop = ndcg_drop(before, after)
    noise = f"P(not reduced) {no_reduction:.2f}"
    if change >= 0:
        return False, f"bias not reduced (weighted relative change {change:+.1%}, {noise})"
    if no_reduction > 1 - confidence:
        return False, (
            f"bias change {change:+.1%} is within the guard users' noise "
            f"({noise} > {1 - confidence:.2f})"
        )
    if drop > max_ndcg_drop:
        return False, (
            f"NDCG@{before.k} dropped {drop:.1%} (> {max_ndcg_drop:.0%} allowed), "
            f"bias change {change:+.1%}"
        )
    return True, f"bias change {change:+.1%} ({noise}), NDCG@{before.k} change {-drop:+.1%}"


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
