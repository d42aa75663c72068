"""Constrained decoding without a model: the catalog's prefix tree, and the catalogs and list
lengths it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from fudlr.data.bundle import Bundle
from fudlr.errors import InputError
from fudlr.recommender.constrained import TitleTree
from fudlr.recommender.recommend import Decoding, RecommendConfig
from tests.conftest import twin_titles_bundle


def test_a_title_that_is_a_prefix_of_another_stays_an_item() -> None:
    eos = 0
    tree = TitleTree.build([[5, 6, eos], [5, 6, 7, eos], [8, eos]], ["a", "a-2", "b"], eos)
    assert sorted(tree.item_at.values()) == [0, 1, 2]
    assert tree.paths[0][:2] == tree.paths[1][:2]
    assert tree.blocked_children([0]) == {tree.paths[0][1]: {tree.paths[0][2]}}
    assert tree.blocked_children([0, 1]) == {0: {tree.paths[0][0]}}


def test_titles_that_tokenise_alike_and_an_empty_catalog_are_refused() -> None:
    with pytest.raises(InputError, match="'x' and 'y' have titles that tokenise to the same"):
        TitleTree.build([[3, 4, 0], [3, 4, 0]], ["x", "y"], 0)
    with pytest.raises(InputError, match="catalog is empty"):
        TitleTree.build([], [], 0)


def test_check_decodable_refuses_twin_titles_and_unfillable_lists(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    from fudlr.recommender.recommend import check_decodable

    twins = Bundle.load(twin_titles_bundle(tiny_bundle, tmp_path / "twins"))
    with pytest.raises(InputError, match="items '1' and '2' share the title") as refused:
        check_decodable(twins, RecommendConfig())
    assert refused.value.field == "title" and refused.value.file.endswith("items.jsonl")
    check_decodable(twins, RecommendConfig(Decoding.GROUNDED))  # grounding ranks both

    bundle = Bundle.load(tiny_bundle)
    longest = max(len(set(row.history)) for row in bundle.split("valid"))
    fits = len(bundle.items) - longest
    check_decodable(bundle, RecommendConfig(top=fits))
    with pytest.raises(InputError, match=f"lists of {fits + 1} items cannot be filled"):
        check_decodable(bundle, RecommendConfig(top=fits + 1))
    check_decodable(bundle, RecommendConfig(top=fits + 1, exclude_history=False))
