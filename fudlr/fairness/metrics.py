"""Hard fairness and accuracy metrics of top-K recommendations (IFairLRS; docs/method.md,
"Metrics").

Item side: GP_g@K (share of group g in the top-K lists), GH_g (share in the histories),
GU_g = GP_g - GH_g, MGU@K = mean_g |GU_g|, DGU@K = max_g GU_g - min_g GU_g.
User side: the gap in mean NDCG@K between user groups. Accuracy: NDCG@K and HR@K of the
single target item. These are the numbers a repair is judged by, so every input problem
is an error rather than a silently zero metric.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fudlr.data.bundle import Bundle
from fudlr.data.jsonl import iter_rows
from fudlr.data.schema import SampleRow
from fudlr.errors import InputError
from fudlr.fairness.groups import Groups, item_groups, user_groups

DEFAULT_KS = (1, 5, 10)
DEFAULT_ITEM_ATTRIBUTE = "popularity_group"
DEFAULT_USER_ATTRIBUTE = "gender"
DECIMALS = 6


class RecommendationRow(BaseModel):
    """One line of a recommendations file; extra fields (sample_id, generation) are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    user_id: str = Field(min_length=1)
    items: list[str]


@dataclass(frozen=True)
class GroupUnfairness:
    """GU per group and its two summaries, MGU (mean |GU|) and DGU (max GU - min GU)."""

    gu: dict[str, float]
    mgu: float
    dgu: float


def load_recommendations(path: str | Path, bundle: Bundle) -> dict[str, list[str]]:
    """Read user_id -> ranked item ids (best first), checking every id against the bundle."""
    path = Path(path)
    rankings: dict[str, list[str]] = {}
    for line, row in iter_rows(path, RecommendationRow):
        if row.user_id in rankings:
            raise InputError(
                f"duplicate user_id '{row.user_id}'", file=path, line=line, field="user_id"
            )
        if row.user_id not in bundle.users:
            raise InputError(f"unknown user '{row.user_id}'", file=path, line=line, field="user_id")
        seen: set[str] = set()
        for position, item_id in enumerate(row.items):
            field = f"items.{position}"
            if item_id not in bundle.items:
                raise InputError(f"unknown item '{item_id}'", file=path, line=line, field=field)
            if item_id in seen:
                raise InputError(
                    f"item '{item_id}' is ranked twice", file=path, line=line, field=field
                )
            seen.add(item_id)
        rankings[row.user_id] = row.items
    return rankings


def check_ks(ks: Iterable[int]) -> list[int]:
    """The K values sorted and deduplicated; K < 1 has no top-K list, so it is refused."""
    checked = sorted(set(ks))
    if not checked:
        raise InputError("no K value given")
    if checked[0] < 1:
        raise InputError(f"K must be at least 1, got {checked[0]}")
    return checked


def group_shares(
    lists: Iterable[Sequence[str]], groups: Groups, *, source: str = "the lists"
) -> dict[str, float]:
    """Share of each group among all group memberships of the items in `lists`.

    An item in several groups (genres) adds one to each of them, and an item repeated across
    lists counts each time. The shares are normalised by the total number of memberships, not
    of items, so they form a distribution over the groups that sums to 1; groups that never
    occur are present with share 0.
    """
    counts = dict.fromkeys(groups.names, 0)
    for items in lists:
        for item_id in items:
            for name in groups.of(item_id):
                counts[name] += 1
    total = sum(counts.values())
    if total == 0:
        raise InputError(f"no item in {source} belongs to a '{groups.attribute}' group")
    return {name: count / total for name, count in counts.items()}


def group_unfairness(
    recommended: Mapping[str, float], history: Mapping[str, float]
) -> GroupUnfairness:
    """GU_g = GP_g - GH_g (> 0: over-recommended) and its MGU/DGU summaries."""
    if recommended.keys() != history.keys():
        raise ValueError(
            f"recommended and historical shares cover different groups: "
            f"{sorted(recommended)} vs {sorted(history)}"
        )
    gu = {name: recommended[name] - history[name] for name in history}
    mgu = sum(abs(value) for value in gu.values()) / len(gu)
    return GroupUnfairness(gu=gu, mgu=mgu, dgu=spread(gu))


def spread(values: Mapping[str, float]) -> float:
    """max - min over groups: DGU on GU values, the user gap on per-group mean utilities."""
    return max(values.values()) - min(values.values())


def hit_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    """HR@K: 1 if the target is among the first K items, else 0."""
    return 1.0 if target in _top(ranked, k) else 0.0


def ndcg_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    """NDCG@K with one relevant item (IDCG = 1): 1/log2(rank + 2), rank 0-based, 0 if absent."""
    top = _top(ranked, k)
    return 1.0 / math.log2(top.index(target) + 2) if target in top else 0.0


def group_means(values: Iterable[tuple[str, float]], groups: Groups) -> dict[str, float]:
    """Mean value per group of (entity id, value) pairs, e.g. mean NDCG per gender.

    Entities without the attribute are skipped; a group with no entity among the pairs is
    left out, since its mean is undefined rather than 0.
    """
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for entity_id, value in values:
        for name in groups.of(entity_id):
            sums[name] += value
            counts[name] += 1
    return {name: sums[name] / counts[name] for name in groups.names if counts[name]}


def evaluate(
    bundle: Bundle,
    split: str,
    recommendations: Mapping[str, Sequence[str]],
    ks: Iterable[int] = DEFAULT_KS,
    item_attribute: str = DEFAULT_ITEM_ATTRIBUTE,
    user_attribute: str = DEFAULT_USER_ATTRIBUTE,
    *,
    source: str | Path | None = None,
    rows: Sequence[SampleRow] | None = None,
) -> dict[str, Any]:
    """All metrics of one split's rows, as the JSON report of `fudlr metrics`.

    Shape: {"k": {"<K>": {"NDCG", "HR", "MGU", "DGU", "GU": {group: x}, "GP": {..},
    "GH": {..}, "user_gap": {"NDCG": gap, "groups": {group: mean NDCG}}}}, "users": rows
    evaluated, "users_without_user_group": rows whose user lacks `user_attribute` (left out
    of the gap), "split", "item_groups", "user_groups"}; floats rounded to 6 decimals.
    `source` names the recommendations file in errors. `rows`: evaluate only these rows of
    the split (e.g. a fixed subset of validation users), default all of them.
    """
    ks = check_ks(ks)
    rows = bundle.split(split) if rows is None else rows
    if not rows:
        raise InputError(f"split '{split}' has no rows", file=bundle.root / f"{split}.jsonl")
    items = item_groups(bundle.items, item_attribute)
    users = user_groups(bundle.users, user_attribute)
    rankings = [_ranking(row.user_id, recommendations, ks[-1], source) for row in rows]
    ungrouped = sum(1 for row in rows if not users.of(row.user_id))
    if ungrouped == len(rows):
        raise InputError(f"no user of split '{split}' has the attribute '{user_attribute}'")
    history = group_shares(
        (row.history for row in rows), items, source=f"the histories of split '{split}'"
    )
    report = {
        "k": {str(k): _metrics_at_k(k, rows, rankings, history, items, users) for k in ks},
        "users": len(rows),
        "users_without_user_group": ungrouped,
        "split": split,
        "item_groups": item_attribute,
        "user_groups": user_attribute,
    }
    return _rounded(report)


def chosen_k(report: Mapping[str, Any], k: int | None = None) -> int:
    """The K a per-group view of a report shows: `k` if it was evaluated, else the largest."""
    evaluated = [int(key) for key in report["k"]]
    if k is None:
        return max(evaluated)
    if k not in evaluated:
        raise InputError(f"K={k} was not evaluated (evaluated: {', '.join(map(str, evaluated))})")
    return k


def _metrics_at_k(
    k: int,
    rows: Sequence[SampleRow],
    rankings: Sequence[Sequence[str]],
    history: dict[str, float],
    items: Groups,
    users: Groups,
) -> dict[str, Any]:
    recommended = group_shares(
        (ranking[:k] for ranking in rankings), items, source=f"the top-{k} lists"
    )
    unfairness = group_unfairness(recommended, history)
    pairs = list(zip(rows, rankings, strict=True))
    ndcg = [ndcg_at_k(ranking, row.target, k) for row, ranking in pairs]
    hits = [hit_at_k(ranking, row.target, k) for row, ranking in pairs]
    utility = group_means(
        ((row.user_id, value) for row, value in zip(rows, ndcg, strict=True)), users
    )
    return {
        "NDCG": sum(ndcg) / len(ndcg),
        "HR": sum(hits) / len(hits),
        "MGU": unfairness.mgu,
        "DGU": unfairness.dgu,
        "GU": unfairness.gu,
        "GP": recommended,
        "GH": history,
        "user_gap": {"NDCG": spread(utility), "groups": utility},
    }


def _ranking(
    user_id: str, recommendations: Mapping[str, Sequence[str]], k: int, source: str | Path | None
) -> Sequence[str]:
    """The user's ranking, long enough for the largest K."""
    if user_id not in recommendations:
        raise InputError(f"no recommendations for user '{user_id}'", file=source)
    ranking = recommendations[user_id]
    if len(ranking) < k:
        raise InputError(
            f"user '{user_id}' has {len(ranking)} recommended items, fewer than K={k}", file=source
        )
    return ranking


def _top(ranked: Sequence[str], k: int) -> list[str]:
    if not 1 <= k <= len(ranked):
        raise ValueError(f"K={k} needs 1 <= K <= {len(ranked)} (the ranking's length)")
    return list(ranked[:k])


def _rounded(value: Any) -> Any:
    """Round floats for the report; `+ 0.0` turns -0.0 into 0.0."""
    if isinstance(value, float):
        return round(value, DECIMALS) + 0.0
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value
