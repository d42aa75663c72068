"""Most popular: every user gets the most interacted catalog items that are not in their history.

Not a fairness method but the scale the others are read on: the accuracy a recommender
must clear to be worth repairing, and the popularity bias at its extreme (every slot
from the most popular group). The benchmark reports it next to the systems.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import islice

from fudlr.data.schema import ItemRow, SampleRow


def interaction_counts(
    items: Mapping[str, ItemRow], attribute: str = "interactions"
) -> dict[str, float]:
    """item id → its count in the catalog's `attribute` (what the popularity groups cut)."""
    missing = [item_id for item_id, item in items.items() if attribute not in item.attributes]
    if missing:
        raise ValueError(f"items lack the attribute '{attribute}', e.g. item {missing[0]}")
    return {item_id: float(item.attributes[attribute]) for item_id, item in items.items()}


def most_popular(
    counts: Mapping[str, float], rows: Sequence[SampleRow], k: int
) -> dict[str, list[str]]:
    """user id → the k items with the largest counts (ties: smaller item id first), leaving
    out the items of the row's history (the ones its prompt lists)."""
    order = sorted(counts, key=lambda item_id: (-counts[item_id], item_id))
    rankings = {}
    for row in rows:
        seen = set(row.history)
        rankings[row.user_id] = list(islice((i for i in order if i not in seen), k))
    return rankings
