"""Hard fairness and accuracy metrics against values computed by hand on a tiny bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fudlr.data.bundle import Bundle
from fudlr.data.jsonl import write_rows
from fudlr.data.schema import ItemRow, SampleRow, UserRow
from fudlr.errors import InputError
from fudlr.fairness import (
    evaluate,
    group_by,
    group_means,
    group_shares,
    group_unfairness,
    hit_at_k,
    item_groups,
    load_recommendations,
    ndcg_at_k,
    user_groups,
)
from fudlr.fairness.cli import metrics
from fudlr.fairness.plot import plot_group_shares, plot_report

# item -> (popularity_group, genres or None when the item has no genres attribute)
ITEMS: dict[str, tuple[int, list[str] | None]] = {
    "i1": (0, ["A"]),
    "i2": (0, ["A", "B"]),
    "i3": (1, ["B"]),
    "i4": (1, ["C"]),
    "i5": (2, []),
    "i6": (2, None),
}
# user -> gender (None: attribute absent), history, target
TEST_ROWS: dict[str, tuple[str | None, list[str], str]] = {
    "u1": ("F", ["i1", "i2"], "i3"),
    "u2": ("M", ["i1", "i3"], "i5"),
    "u3": ("F", ["i1"], "i6"),
    "u4": (None, ["i4"], "i1"),
}
# targets sit at 0-based ranks 0, 1, 1 and 2
RECOMMENDATIONS: dict[str, list[str]] = {
    "u1": ["i3", "i5", "i1"],
    "u2": ["i6", "i5", "i2"],
    "u3": ["i5", "i6", "i4"],
    "u4": ["i2", "i4", "i1"],
}
INV_LOG3 = 1 / math.log2(3)


def _sample(user_id: str, history: list[str], target: str) -> SampleRow:
    return SampleRow(
        sample_id=f"s-{user_id}",
        user_id=user_id,
        history=history,
        target=target,
        prompt="p",
        completion="c",
    )


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    items = []
    for item_id, (popularity, genres) in ITEMS.items():
        attributes: dict[str, Any] = {"popularity_group": popularity}
        if genres is not None:
            attributes["genres"] = genres
        items.append(ItemRow(item_id=item_id, title=f"Title {item_id}", attributes=attributes))
    users = [
        UserRow(user_id=user_id, attributes={"gender": gender} if gender else {})
        for user_id, (gender, _, _) in TEST_ROWS.items()
    ]
    samples = [_sample(user, history, target) for user, (_, history, target) in TEST_ROWS.items()]
    write_rows(root / "items.jsonl", items)
    write_rows(root / "users.jsonl", users)
    for split in ("train", "valid", "test"):
        write_rows(root / f"{split}.jsonl", samples)
    return root


@pytest.fixture
def bundle(bundle_dir: Path) -> Bundle:
    return Bundle.load(bundle_dir)


def _write_recs(path: Path, rankings: dict[str, list[str]]) -> Path:
    rows = [{"user_id": user, "items": items, "sample_id": "x"} for user, items in rankings.items()]
    write_rows(path, rows)
    return path


@pytest.fixture
def recs_file(tmp_path: Path) -> Path:
    return _write_recs(tmp_path / "recs.jsonl", RECOMMENDATIONS)


# --- groups ---------------------------------------------------------------------------


def test_list_attribute_puts_item_in_each_group_and_missing_in_none(bundle: Bundle) -> None:
    genres = item_groups(bundle.items, "genres")
    assert genres.names == ("A", "B", "C")
    assert genres.of("i2") == ("A", "B")
    assert genres.of("i5") == ()  # empty list
    assert genres.of("i6") == ()  # attribute absent


def test_numeric_groups_sort_numerically() -> None:
    groups = group_by({"a": {"p": 10}, "b": {"p": 2}, "c": {"p": 0}}, "p", "item")
    assert groups.names == ("0", "2", "10")


def test_unknown_attribute_names_it_and_lists_available(bundle: Bundle) -> None:
    with pytest.raises(InputError, match=r"'colour'.*available: genres, popularity_group"):
        item_groups(bundle.items, "colour")
    with pytest.raises(InputError, match=r"'age'.*available: gender"):
        user_groups(bundle.users, "age")


# --- low-level metrics ----------------------------------------------------------------


def test_group_unfairness_three_groups() -> None:
    result = group_unfairness({"0": 0.25, "1": 0.25, "2": 0.5}, {"0": 2 / 3, "1": 1 / 3, "2": 0.0})
    assert result.gu == pytest.approx({"0": -5 / 12, "1": -1 / 12, "2": 0.5})
    assert result.mgu == pytest.approx(1 / 3)
    assert result.dgu == pytest.approx(11 / 12)


def test_group_shares_count_multi_group_items_once_in_each(bundle: Bundle) -> None:
    genres = item_groups(bundle.items, "genres")
    # memberships: i1 A, i2 A+B, i6 none -> A 2, B 1, C 0 out of 3
    shares = group_shares([["i1", "i2"], ["i6"]], genres)
    assert shares == pytest.approx({"A": 2 / 3, "B": 1 / 3, "C": 0.0})
    with pytest.raises(InputError, match="belongs to a 'genres' group"):
        group_shares([["i5", "i6"]], genres)


def test_ndcg_and_hit_at_known_ranks() -> None:
    ranked = ["a", "b", "c", "d"]
    assert ndcg_at_k(ranked, "a", 1) == 1.0
    assert ndcg_at_k(ranked, "b", 2) == pytest.approx(INV_LOG3)
    assert ndcg_at_k(ranked, "d", 4) == pytest.approx(1 / math.log2(5))
    assert ndcg_at_k(ranked, "c", 2) == 0.0
    assert hit_at_k(ranked, "c", 3) == 1.0
    assert hit_at_k(ranked, "c", 2) == 0.0
    with pytest.raises(ValueError):
        ndcg_at_k(ranked, "a", 5)


def test_group_means_skip_users_without_the_attribute(bundle: Bundle) -> None:
    genders = user_groups(bundle.users, "gender")
    means = group_means([("u1", 1.0), ("u3", 0.0), ("u2", 0.5), ("u4", 9.0)], genders)
    assert means == {"F": 0.5, "M": 0.5}


# --- evaluate -------------------------------------------------------------------------


def test_evaluate_popularity_groups_accuracy_and_user_gap(bundle: Bundle) -> None:
    report = evaluate(bundle, "test", RECOMMENDATIONS, [3, 1])
    assert list(report["k"]) == ["1", "3"]
    assert report["users"] == 4
    assert report["users_without_user_group"] == 1
    assert (report["split"], report["item_groups"], report["user_groups"]) == (
        "test",
        "popularity_group",
        "gender",
    )
    # histories: i1 x3, i2 -> group 0: 4; i3, i4 -> group 1: 2; group 2: 0
    at1, at3 = report["k"]["1"], report["k"]["3"]
    assert at1["GH"] == pytest.approx({"0": 2 / 3, "1": 1 / 3, "2": 0.0}, abs=1e-6)
    # top-1: i3 (1), i6 (2), i5 (2), i2 (0)
    assert at1["GP"] == pytest.approx({"0": 0.25, "1": 0.25, "2": 0.5})
    assert at1["GU"] == pytest.approx({"0": -5 / 12, "1": -1 / 12, "2": 0.5}, abs=1e-6)
    assert at1["MGU"] == pytest.approx(1 / 3, abs=1e-6)
    assert at1["DGU"] == pytest.approx(11 / 12, abs=1e-6)
    assert (at1["NDCG"], at1["HR"]) == (0.25, 0.25)
    assert at1["user_gap"] == {"NDCG": 0.5, "groups": {"F": 0.5, "M": 0.0}}
    # top-3 counts: group 0: 4, group 1: 3, group 2: 5 of 12
    assert at3["GP"] == pytest.approx({"0": 1 / 3, "1": 1 / 4, "2": 5 / 12}, abs=1e-6)
    assert at3["MGU"] == pytest.approx(5 / 18, abs=1e-6)
    assert at3["DGU"] == pytest.approx(0.75, abs=1e-6)
    assert at3["HR"] == 1.0
    assert at3["NDCG"] == pytest.approx((1 + 2 * INV_LOG3 + 0.5) / 4, abs=1e-6)
    assert at3["user_gap"]["groups"] == pytest.approx(
        {"F": (1 + INV_LOG3) / 2, "M": INV_LOG3}, abs=1e-6
    )
    assert at3["user_gap"]["NDCG"] == pytest.approx((1 - INV_LOG3) / 2, abs=1e-6)


def test_evaluate_genres_counts_multi_genre_items_in_each(bundle: Bundle) -> None:
    report = evaluate(bundle, "test", RECOMMENDATIONS, [1], item_attribute="genres")
    at1 = report["k"]["1"]
    # histories: i1 x3 (A), i2 (A, B), i3 (B), i4 (C) -> 7 memberships
    assert at1["GH"] == pytest.approx({"A": 4 / 7, "B": 2 / 7, "C": 1 / 7}, abs=1e-6)
    # top-1: i3 (B), i6 (none), i5 (none), i2 (A, B) -> 3 memberships
    assert at1["GP"] == pytest.approx({"A": 1 / 3, "B": 2 / 3, "C": 0.0}, abs=1e-6)
    assert sum(at1["GP"].values()) == pytest.approx(1.0)
    # GU: A 1/3 - 4/7 = -5/21 (min), B 2/3 - 2/7 = 8/21 (max), C -1/7
    assert at1["DGU"] == pytest.approx(13 / 21, abs=1e-6)


def test_report_is_plain_json_with_six_decimals(bundle: Bundle) -> None:
    report = evaluate(bundle, "test", RECOMMENDATIONS, [3])
    assert json.loads(json.dumps(report)) == report
    assert report["k"]["3"]["NDCG"] == round((1 + 2 * INV_LOG3 + 0.5) / 4, 6)


# --- errors ---------------------------------------------------------------------------


def test_user_without_recommendations_names_user_and_file(bundle: Bundle, tmp_path: Path) -> None:
    path = _write_recs(tmp_path / "partial.jsonl", {"u1": RECOMMENDATIONS["u1"]})
    with pytest.raises(InputError, match=r"partial\.jsonl: no recommendations for user 'u2'"):
        evaluate(bundle, "test", load_recommendations(path, bundle), [1], source=path)


def test_unknown_item_is_located_at_file_and_line(bundle: Bundle, tmp_path: Path) -> None:
    path = _write_recs(tmp_path / "r.jsonl", {"u1": ["i1"], "u2": ["i1", "nope"]})
    with pytest.raises(InputError, match=r"r\.jsonl:2: field 'items\.1': unknown item 'nope'"):
        load_recommendations(path, bundle)


def test_duplicate_user_rows_are_refused(bundle: Bundle, tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    write_rows(path, [{"user_id": "u1", "items": ["i1"]}, {"user_id": "u1", "items": ["i2"]}])
    with pytest.raises(InputError, match=r"r\.jsonl:2: .*duplicate user_id 'u1'"):
        load_recommendations(path, bundle)


def test_k_beyond_a_list_names_user_length_and_k(bundle: Bundle) -> None:
    short = {**RECOMMENDATIONS, "u3": ["i5", "i6"]}
    with pytest.raises(InputError, match=r"user 'u3' has 2 recommended items, fewer than K=3"):
        evaluate(bundle, "test", short, [1, 3])


@pytest.mark.parametrize("ks", [[0, 1], [-2], []])
def test_k_below_one_or_missing_is_refused(bundle: Bundle, ks: list[int]) -> None:
    with pytest.raises(InputError, match="K"):
        evaluate(bundle, "test", RECOMMENDATIONS, ks)


# --- plot -----------------------------------------------------------------------------


def test_plot_writes_png(tmp_path: Path) -> None:
    history = {"0": 0.5, "1": 0.3, "2": 0.2}
    systems = {"before": {"0": 0.2, "1": 0.3, "2": 0.5}, "after": {"0": 0.4, "1": 0.3, "2": 0.3}}
    path = plot_group_shares(history, systems, title="shares", path=tmp_path / "p" / "s.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="covers groups"):
        plot_group_shares(history, {"bad": {"0": 1.0}}, title="t", path=tmp_path / "x.png")


def test_plot_report_refuses_unevaluated_k(bundle: Bundle, tmp_path: Path) -> None:
    report = evaluate(bundle, "test", RECOMMENDATIONS, [1, 3])
    assert plot_report(report, tmp_path / "r.png", 1).stat().st_size > 0
    with pytest.raises(InputError, match=r"K=5 was not evaluated \(evaluated: 1, 3\)"):
        plot_report(report, tmp_path / "r.png", 5)


# --- command --------------------------------------------------------------------------


def _run_metrics(args: list[str]) -> Any:
    """The command alone, without fudlr.cli's other sub-commands."""
    app = typer.Typer()
    app.command()(metrics)
    return CliRunner().invoke(app, args)


def test_command_json_out_and_plot(bundle_dir: Path, recs_file: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "m.json", tmp_path / "m.png"
    args = ["--bundle", str(bundle_dir), "--recommendations", str(recs_file), "--k", "1,3"]
    result = _run_metrics([*args, "--json", "--out", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report["k"]) == ["1", "3"]
    assert report["k"]["1"]["user_gap"]["groups"] == {"F": 0.5, "M": 0.0}
    assert json.loads(out.read_text()) == report
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_command_prints_tables(bundle_dir: Path, recs_file: Path) -> None:
    args = ["--bundle", str(bundle_dir), "--recommendations", str(recs_file), "--k", "1,3"]
    result = _run_metrics(args)
    assert result.exit_code == 0, result.output
    assert "gender gap (NDCG)" in result.stdout
    assert "GP@3" in result.stdout
    assert "1 evaluated users lack 'gender'" in result.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k", "0,5"], "K must be at least 1"),
        (["--k", "1,x"], "--k expects comma-separated integers"),
        (["--item-groups", "colour"], "no item has the attribute 'colour'"),
        (["--split", "dev"], "unknown split 'dev'"),
    ],
)
def test_fudlr_metrics_errors_are_one_line_exit_2(
    bundle_dir: Path,
    recs_file: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    from clients.cli import main  # imports every sub-command of fudlr.cli

    args = ["metrics", "--bundle", str(bundle_dir), "--recommendations", str(recs_file)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *extra])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert message in lines[0]


def test_a_paired_change_resamples_the_users_under_both_systems() -> None:
    from fudlr.fairness.bootstrap import paired_change

    # each user: (served by the original, served after the repair); the repair serves
    # every user the original did and 20 more, so the share rises by 0.2 in every resample
    users = [(i < 30, i < 50) for i in range(100)]

    def share(position: int):
        return lambda rows: sum(row[position] for row in rows) / len(rows)

    rise = paired_change(users, share(0), share(1), resamples=300, seed=1)
    assert rise.mean == pytest.approx(0.2) and 0.1 < rise.low <= rise.mean <= rise.high < 0.3
    assert rise.p_not_above == 0.0 and rise.users == 100 and rise.resamples == 300
    same = paired_change(users, share(0), share(0), resamples=50)
    assert same.mean == same.low == same.high == 0 and same.p_not_above == 1.0
    # a set metric that is not a mean of per-user values: the gap between the two shares
    gap = paired_change(users, lambda rows: 0.0, lambda rows: share(1)(rows) - share(0)(rows))
    assert gap.low > 0.1
    with pytest.raises(ValueError, match="needs users"):
        paired_change([], share(0), share(1))


def test_paired_changes_measure_every_named_metric_on_the_same_resamples() -> None:
    from fudlr.fairness.bootstrap import paired_change, paired_changes

    users = [(i < 30, i < 50) for i in range(100)]

    def shares(position: int):
        def measured(rows):
            served = sum(row[position] for row in rows) / len(rows)
            return {"served": served, "unserved": 1 - served}

        return measured

    both = paired_changes(users, shares(0), shares(1), resamples=200, seed=3)
    assert set(both) == {"served", "unserved"}
    served, unserved = both["served"], both["unserved"]
    assert served.mean == pytest.approx(0.2) and unserved.mean == pytest.approx(-0.2)
    # one measurement per resample: the two metrics' changes mirror each other exactly
    assert served.low == pytest.approx(-unserved.high)
    assert served.high == pytest.approx(-unserved.low)
    assert served.p_not_above == 0.0 and unserved.p_not_above == 1.0
    alone = paired_change(
        users,
        lambda rows: shares(0)(rows)["served"],
        lambda rows: shares(1)(rows)["served"],
        resamples=200,
        seed=3,
    )
    assert alone == served
