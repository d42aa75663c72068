"""Baselines: IFairLRS's reweighting formula, its reranking's penalty and α choice, and the
most-popular reference."""

from __future__ import annotations

import pytest
import torch

from fudlr.baselines.popularity import interaction_counts, most_popular
from fudlr.baselines.rerank import Candidate, choose_alpha, distance_scale, group_bias
from fudlr.baselines.reweight import ifairlrs_weights
from fudlr.data.schema import ItemRow, SampleRow
from fudlr.fairness.groups import Groups
from fudlr.recommender.grounding import rank_by_distance

GROUPS = Groups(
    kind="item",
    attribute="popularity_group",
    names=("0", "1"),
    members={"a": ("0",), "b": ("1",), "c": ("1",), "x": ()},
)


def sample(sample_id: str, history: list[str], target: str) -> SampleRow:
    return SampleRow(
        sample_id=sample_id,
        user_id="u",
        history=history,
        target=target,
        prompt="p",
        completion="c",
    )


def test_reweighting_matches_targets_to_histories():
    # histories: group 0 = 3/4, group 1 = 1/4; targets: group 0 = 1/3, group 1 = 2/3
    samples = [
        sample("s1", ["a", "a"], "b"),
        sample("s2", ["a", "c"], "c"),
        sample("s3", [], "a"),
        sample("s4", [], "x"),  # target without the attribute: raw weight 1
    ]
    weights = ifairlrs_weights(samples, GROUPS)
    raw = {"s1": 0.25 / (2 / 3), "s2": 0.25 / (2 / 3), "s3": 0.75 / (1 / 3), "s4": 1.0}
    mean = sum(raw.values()) / 4
    assert weights == pytest.approx({key: value / mean for key, value in raw.items()})
    assert sum(weights.values()) / len(weights) == pytest.approx(1.0)
    assert weights["s1"] < weights["s4"] < weights["s3"]  # the over-targeted group weighs less


def test_rerank_penalises_over_recommended_groups():
    bias = group_bias({"0": 0.2, "1": 0.8}, {"0": 0.5, "1": 0.5})
    assert bias == pytest.approx({"0": -0.6, "1": 0.6})
    items = ["a", "b", "c", "x"]
    assert torch.equal(distance_scale(items, GROUPS, bias, 0.0), torch.ones(4, dtype=torch.float64))
    scale = distance_scale(items, GROUPS, bias, 1.0)
    assert scale[1] > 1 > scale[0] and scale[3] == 1  # "x" has no group: unchanged
    # a query nearer to b than to a: b first without the penalty, a first with it
    catalog = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [5.0, 5.0]])
    query = torch.tensor([[0.5, 0.6]])
    assert rank_by_distance(query, catalog)[0, 0] == 1
    assert rank_by_distance(query, catalog, scale)[0, 0] == 0


def test_alpha_is_the_fairest_within_the_accuracy_budget():
    candidates = [
        Candidate(0.0, unfairness=0.30, ndcg=0.100),
        Candidate(0.1, unfairness=0.20, ndcg=0.097),
        Candidate(0.5, unfairness=0.10, ndcg=0.090),  # fairer, but 10% less accurate
        Candidate(1.0, unfairness=0.20, ndcg=0.099),  # ties 0.1: the smaller alpha wins
    ]
    assert choose_alpha(candidates, max_ndcg_drop=0.05).alpha == 0.1
    assert choose_alpha(candidates, max_ndcg_drop=0.2).alpha == 0.5
    assert choose_alpha(candidates, max_ndcg_drop=0.0).alpha == 0.0
    with pytest.raises(ValueError, match="alpha = 0"):
        choose_alpha(candidates[1:], 0.05)


def test_most_popular_ranks_by_count_and_leaves_out_the_history():
    items = {
        item_id: ItemRow(item_id=item_id, title=item_id, attributes={"interactions": count})
        for item_id, count in {"a": 5, "b": 9, "c": 5, "d": 1}.items()
    }
    counts = interaction_counts(items)
    rows = [sample("s1", ["b"], "a"), sample("s2", [], "d").model_copy(update={"user_id": "v"})]
    rankings = most_popular(counts, rows, k=3)
    assert rankings == {"u": ["a", "c", "d"], "v": ["b", "a", "c"]}  # ties: smaller id first
    del items["d"].attributes["interactions"]
    with pytest.raises(ValueError, match=r"lack the attribute 'interactions', e\.g\. item d"):
        interaction_counts(items)
