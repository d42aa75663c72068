"""Hard metrics of a (patched) recommender on a set of users, and the guard's verdict.

The guard is the last word: predictions choose the samples, but an adapter is published
only if beam search + grounding on held-out users shows the bias went down and accuracy
stayed within the job's tolerance.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fudlr.data.bundle import Bundle
from fudlr.data.schema import SampleRow
from fudlr.fairness.metrics import evaluate
from fudlr.recommender.recommend import RecommendConfig, Recommender
from fudlr.repair.spec import BiasSpec


@dataclass
class Measurement:
    """Each bias's hard metric and per-group numbers, accuracy at `k`, the full reports."""

    biases: dict[str, float]
    groups: dict[str, dict]
    ndcg: float
    hr: float
    k: int
    exact_matches: int
    reports: dict[str, dict]

    def shares(self, item_attribute: str, k: int) -> dict[str, float]:
        """GP@K per item group of `item_attribute` (from the report that grouped by it)."""
        report = next(r for key, r in self.reports.items() if key.startswith(f"{item_attribute}|"))
        return report["k"][str(k)]["GP"]

    def summary(self) -> dict:
        return {
            "biases": self.biases,
            "groups": self.groups,
            f"NDCG@{self.k}": self.ndcg,
            f"HR@{self.k}": self.hr,
            "exact_title_generations": self.exact_matches,
            "users": next(iter(self.reports.values()))["users"],
        }


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
    by_user = ranked.by_user(rows)
    ks = sorted({accuracy_k, *(b.k for b in biases)})
    item_attribute = next((b.attribute for b in biases if b.side == "item"), "popularity_group")
    user_attribute = next((b.attribute for b in biases if b.side == "user"), "gender")
    reports: dict[str, dict] = {}
    values: dict[str, float] = {}
    groups: dict[str, dict] = {}
    for bias in biases:
        item_attr = bias.attribute if bias.side == "item" else item_attribute
        user_attr = bias.attribute if bias.side == "user" else user_attribute
        key = f"{item_attr}|{user_attr}"
        if key not in reports:
            reports[key] = evaluate(bundle, split, by_user, ks, item_attr, user_attr, rows=rows)
        at_k = reports[key]["k"][str(bias.k)]
        if bias.side == "item":
            values[bias.label] = at_k[bias.metric]
            groups[bias.label] = {"GP": at_k["GP"], "GH": at_k["GH"], "GU": at_k["GU"]}
        else:
            values[bias.label] = at_k["user_gap"]["NDCG"]
            groups[bias.label] = {"NDCG": at_k["user_gap"]["groups"]}
    if not reports:
        reports["default"] = evaluate(
            bundle, split, by_user, ks, item_attribute, user_attribute, rows=rows
        )
    accuracy = next(iter(reports.values()))["k"][str(accuracy_k)]
    return Measurement(
        values, groups, accuracy["NDCG"], accuracy["HR"], accuracy_k, ranked.exact_matches, reports
    )


def verdict(
    before: Measurement, after: Measurement, biases: Sequence[BiasSpec], max_ndcg_drop: float
) -> tuple[bool, str]:
    """Accept when the weighted relative change of the biases is negative (fairer) and the
    relative NDCG drop is within `max_ndcg_drop`; say why otherwise."""
    change = sum(
        bias.weight
        * (after.biases[bias.label] - before.biases[bias.label])
        / max(abs(before.biases[bias.label]), 1e-12)
        for bias in biases
    ) / sum(bias.weight for bias in biases)
    drop = (before.ndcg - after.ndcg) / before.ndcg if before.ndcg > 0 else 0.0
    if change >= 0:
        return False, f"bias not reduced (weighted relative change {change:+.1%})"
    if drop > max_ndcg_drop:
        return False, (
            f"NDCG@{before.k} dropped {drop:.1%} (> {max_ndcg_drop:.0%} allowed), "
            f"bias change {change:+.1%}"
        )
    return True, f"bias change {change:+.1%}, NDCG@{before.k} change {-drop:+.1%}"
