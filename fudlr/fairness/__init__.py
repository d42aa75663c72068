"""Fairness of recommendations: item/user groups and the hard metrics (docs/method.md, "Metrics").

Plotting lives in fudlr.fairness.plot and the command in fudlr.fairness.cli, so that
importing the metrics pulls in neither matplotlib nor typer.
"""

from fudlr.fairness.groups import Groups, group_by, item_groups, user_groups
from fudlr.fairness.metrics import (
    GroupUnfairness,
    chosen_k,
    evaluate,
    group_means,
    group_shares,
    group_unfairness,
    hit_at_k,
    load_recommendations,
    ndcg_at_k,
    spread,
)

__all__ = [
    "GroupUnfairness",
    "Groups",
    "chosen_k",
    "evaluate",
    "group_by",
    "group_means",
    "group_shares",
    "group_unfairness",
    "hit_at_k",
    "item_groups",
    "load_recommendations",
    "ndcg_at_k",
    "spread",
    "user_groups",
]
