"""Constrained decoding: the beam search over the catalog's prefix tree on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fudlr.data.bundle import Bundle
from fudlr.errors import InputError
from fudlr.models.lora import load_adapter
from fudlr.models.store import load_base_model, model_digest
from fudlr.recommender.recommend import Decoding, RecommendConfig, Recommender
from fudlr.recommender.scoring import score_completions
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def recommender(tiny_model: Path, tiny_bundle: Path, tiny_adapter) -> Recommender:
    base, tokenizer = load_base_model(tiny_model)
    model = load_adapter(base, tiny_adapter[0])
    return Recommender(model, tokenizer, Bundle.load(tiny_bundle), model_digest(tiny_model))


def _exact_top(
    recommender: Recommender,
    prompt: str,
    top: int,
    normalise: bool = False,
    excluded: frozenset[str] = frozenset(),
):
    """(item ids, scores) of the `top` best titles outside `excluded`, by scoring every
    title of the catalog."""
    from fudlr.recommender.encoding import encode_completion

    with torch.no_grad():
        scores = score_completions(
            recommender.model, recommender.tokenizer, prompt, recommender.item_texts
        )
    if normalise:
        lengths = [len(encode_completion(recommender.tokenizer, t)) for t in recommender.item_texts]
        scores = scores / torch.tensor(lengths, dtype=scores.dtype)
    for item in excluded:
        scores[recommender.item_index[item]] = float("-inf")
    best = scores.topk(top)
    return [recommender.item_ids[i] for i in best.indices.tolist()], best.values.tolist()


def test_every_list_holds_distinct_catalog_items_outside_the_history(
    recommender: Recommender, tiny_bundle: Path
) -> None:
    rows = Bundle.load(tiny_bundle).split("test")
    config = RecommendConfig(num_beams=3, top=5, exclude_history=True, batch_size=4)
    ranked = recommender.rank(rows, config)
    for row, items, generation in zip(rows, ranked.rankings, ranked.generations, strict=True):
        assert len(items) == 5 == len(set(items))
        assert set(items) <= set(recommender.item_ids)
        assert not set(items) & set(row.history)
        assert generation == recommender.item_texts[recommender.item_index[items[0]]]
    assert all(ranked.grounded_exactly)
    assert RecommendConfig().excludes_history  # constrained: by default
    assert not RecommendConfig(Decoding.GROUNDED).excludes_history  # grounding: the protocol


@pytest.mark.parametrize(("normalise", "exclude"), [(False, False), (True, False), (False, True)])
def test_with_beams_covering_the_catalog_the_top_k_is_exact(
    recommender: Recommender, tiny_bundle: Path, normalise: bool, exclude: bool
) -> None:
    rows = Bundle.load(tiny_bundle).split("valid")[:4]
    catalog = len(recommender.item_ids)
    config = RecommendConfig(
        num_beams=catalog,
        top=8,
        batch_size=2,
        length_normalization=normalise,
        exclude_history=exclude,
    )
    found = recommender.rank(rows, config)
    for row, items in zip(rows, found.rankings, strict=True):
        excluded = frozenset(row.history if exclude else ())
        expected, _ = _exact_top(recommender, row.prompt, 8, normalise, excluded)
        assert items == expected


def test_every_title_is_reachable_including_shared_prefixes(
    recommender: Recommender, tiny_bundle: Path
) -> None:
    """ "Movie 1 (1971)" and "Movie 10 (1980)" share their first tokens; the whole catalog,
    asked for at once, comes back item for item, ordered by exact score."""
    tree = recommender.title_search.tree
    shared = [
        (a, b)
        for a in range(tree.items)
        for b in range(tree.items)
        if a != b and tree.paths[a][0] == tree.paths[b][0]
    ]
    assert shared, "the tiny catalog should have titles with a common prefix"
    row = Bundle.load(tiny_bundle).split("test")[0]
    catalog = len(recommender.item_ids)
    config = RecommendConfig(num_beams=catalog, top=catalog, exclude_history=False)
    ranked = recommender.rank([row], config)
    expected, _ = _exact_top(recommender, row.prompt, catalog)
    assert ranked.rankings[0] == expected


def test_asking_for_more_items_than_reachable_is_refused(
    recommender: Recommender, tiny_bundle: Path
) -> None:
    row = Bundle.load(tiny_bundle).split("test")[0]
    catalog = len(recommender.item_ids)
    with pytest.raises(InputError, match=f"only {catalog - len(set(row.history))} catalog items"):
        recommender.rank([row], RecommendConfig(top=catalog, exclude_history=True))


def test_recommend_cli_writes_constrained_lists_and_refuses_unknown_decodings(
    tmp_path: Path, tiny_model: Path, tiny_bundle: Path, tiny_adapter, capsys
) -> None:
    out = tmp_path / "recs.jsonl"
    base = ["recommend", "--base-model", str(tiny_model), "--adapter", str(tiny_adapter[0])]
    base += ["--bundle", str(tiny_bundle), "--out", str(out)]
    code, _, err = run_cli([*base, "--decoding", "constrained", "--top", "4"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(row["items"]) == 4 and row["grounded_exactly"] for row in rows)

    code, _, err = run_cli([*base, "--decoding", "sampled"], capsys)
    assert code == 2
    assert "'sampled'" in err and "constrained" in err and "grounded" in err
    assert len(err.strip().splitlines()) == 1
    config = RecommendConfig(decoding=Decoding("grounded"))
    assert config.list_length is None


def test_recommend_and_metrics_take_the_same_subset_of_users(
    tmp_path: Path, tiny_model: Path, tiny_bundle: Path, tiny_adapter, capsys
) -> None:
    out, report = tmp_path / "recs.jsonl", tmp_path / "metrics.json"
    every_user = [row.user_id for row in Bundle.load(tiny_bundle).split("test")]
    code, _, err = run_cli(
        [
            *("recommend", "--base-model", str(tiny_model), "--adapter", str(tiny_adapter[0])),
            *("--bundle", str(tiny_bundle), "--out", str(out), "--top", "3"),
            *("--users", "4", "--seed", "5"),
        ],
        capsys,
    )
    assert code == 0, err
    users = [json.loads(line)["user_id"] for line in out.read_text().splitlines()]
    assert len(users) == 4 and users == [user for user in every_user if user in users]
    metrics = ["metrics", "--bundle", str(tiny_bundle), "--recommendations", str(out)]
    metrics += ["--k", "1,3", "--out", str(report)]
    code, _, err = run_cli([*metrics, "--users", "4", "--seed", "5"], capsys)
    assert code == 0, err
    assert json.loads(report.read_text())["users"] == 4
    code, _, err = run_cli([*metrics, "--users", "4", "--seed", "6"], capsys)  # other users
    assert code == 2 and "no recommendations for user" in err
    assert len(err.strip().splitlines()) == 1
