"""The MovieLens bundle builder and `fudlr data`: split protocol, groups, readers, errors, CLI."""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from fudlr.data.builder import build_movielens_bundle, popularity_groups
from fudlr.data.bundle import BUNDLE_FILES, Bundle
from fudlr.data.fetch import ML100K_FILES, PROVENANCE
from fudlr.data.prompts import MOVIES
from fudlr.errors import InputError
from fudlr.paths import cache_dir
from tests.conftest import LAYOUTS, TinyMovieLens, run_cli

HISTORY = 5  # the history length tiny_bundle is built with


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUDLR_CACHE_DIR", str(tmp_path / "cache"))


def sequences(data: TinyMovieLens, min_rating: float = 0) -> dict[str, list[str]]:
    """Each user's item ids in (timestamp, item id) order: the protocol, computed independently."""
    by_user = defaultdict(list)
    for user, item, rating, timestamp in data.ratings:
        if rating >= min_rating:
            by_user[user].append((timestamp, item))
    return {str(user): [str(item) for _, item in sorted(rows)] for user, rows in by_user.items()}


def read_bytes(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in (*BUNDLE_FILES, "meta.json")}


# ----------------------------------------------------------------------------- protocol


def test_split_protocol(tiny_bundle: Path, tiny_movielens: TinyMovieLens) -> None:
    bundle = Bundle.load(tiny_bundle)
    expected = sequences(tiny_movielens)
    assert len(bundle.items) == 30 and len(bundle.users) == 12
    for row in bundle.split("test"):
        sequence = expected[row.user_id]
        assert row.sample_id == f"test-{row.user_id}"
        assert row.target == sequence[-1]
        assert row.history == sequence[:-1][-HISTORY:]
    for row in bundle.split("valid"):
        sequence = expected[row.user_id]
        assert row.target == sequence[-2]
        assert row.history == sequence[:-2][-HISTORY:]
    train = bundle.split("train")
    assert len(train) == sum(len(sequence) - 3 for sequence in expected.values())
    for row in train:
        user, t = row.sample_id.split("-")[1:]
        portion = expected[user][:-2]
        assert row.user_id == user and row.target == portion[int(t)]
        assert row.history == portion[max(0, int(t) - HISTORY) : int(t)]
    assert max(len(row.history) for row in train) == HISTORY
    assert min(len(row.history) for row in train) == 1
    order = [(int(row.user_id), int(row.sample_id.split("-")[2])) for row in train]
    assert order == sorted(order)


def test_prompts_are_rendered_from_titles(tiny_bundle: Path) -> None:
    bundle = Bundle.load(tiny_bundle)
    for row in bundle.split("valid"):
        titles = [bundle.items[item_id].title for item_id in row.history]
        assert row.prompt == MOVIES.prompt(titles)
        assert row.completion == MOVIES.completion(bundle.items[row.target].title)
    assert bundle.items["3"].title == "Am\xe9lie (1973)"
    assert bundle.items["3"].attributes["year"] == 1973
    assert bundle.meta["template"] == MOVIES.describe()


def test_ties_break_by_item_id_and_min_rating_filters(
    tmp_path: Path, tiny_movielens: TinyMovieLens
) -> None:
    tied = [(u, i, r, 1 if u == 1 else ts) for u, i, r, ts in tiny_movielens.ratings]
    data = TinyMovieLens(tiny_movielens.users, tiny_movielens.items, tied)
    build_movielens_bundle(data.write(tmp_path / "source"), tmp_path / "out", min_rating=3)
    bundle = Bundle.load(tmp_path / "out")
    expected = sequences(data, min_rating=3)
    user_1 = sorted(int(item) for item in expected["1"])
    assert [int(item) for item in expected["1"]] == user_1  # all tied: item id order
    tests = {row.user_id: row for row in bundle.split("test")}
    assert tests["1"].target == expected["1"][-1]
    assert all(tests[user].target == sequence[-1] for user, sequence in expected.items())
    assert bundle.meta["protocol"]["min_rating"] == 3


def test_users_with_fewer_than_three_interactions_only_train(
    tmp_path: Path, tiny_movielens: TinyMovieLens
) -> None:
    source = tiny_movielens.write(tmp_path / "source")
    with (source / "u.user").open("a") as handle:
        handle.write("13|30|F|writer|00013\n")
    with (source / "u.data").open("a") as handle:
        handle.write("13\t5\t4\t890000002\n13\t7\t4\t890000001\n")
    summary = build_movielens_bundle(source, tmp_path / "out")
    bundle = Bundle.load(tmp_path / "out")
    assert summary.counts["users_skipped"] == 1 == bundle.meta["counts"]["users_skipped"]
    assert "13" not in {row.user_id for row in bundle.split("test")}
    assert [
        (r.sample_id, r.history, r.target) for r in bundle.split("train") if r.user_id == "13"
    ] == [("train-13-1", ["7"], "5")]


def test_popularity_groups(tiny_bundle: Path, tiny_movielens: TinyMovieLens) -> None:
    bundle = Bundle.load(tiny_bundle)
    counts = Counter(item for seq in sequences(tiny_movielens).values() for item in seq[:-2])
    items = list(bundle.items.values())
    assert [int(item.item_id) for item in items] == list(range(1, 31))
    assert all(item.attributes["interactions"] == counts[item.item_id] for item in items)
    ranked = sorted(items, key=lambda item: (counts[item.item_id], int(item.item_id)))
    assert [item.attributes["popularity_group"] for item in ranked] == [
        g for g in range(5) for _ in range(6)
    ]
    meta = bundle.meta["groups"]["popularity_group"]
    assert meta["sizes"] == [6] * 5 and meta["kind"] == "item"
    assert meta["interaction_thresholds"] == [
        max(counts[item.item_id] for item in ranked[6 * g : 6 * g + 6]) for g in range(5)
    ]
    genders = Counter(user.attributes["gender"] for user in bundle.users.values())
    assert bundle.meta["groups"]["gender"]["sizes"] == [genders["F"], genders["M"]]


def test_popularity_group_sizes_follow_array_split() -> None:
    groups = popularity_groups(list(range(1, 1683)), Counter())
    assert [list(groups.values()).count(g) for g in range(5)] == [337, 337, 336, 336, 336]
    assert groups[1] == 0 and groups[1682] == 4  # ties: lower id counts as less popular


def test_train_size_is_a_seeded_subset(tmp_path: Path, ml100k_source: Path) -> None:
    full = build_movielens_bundle(ml100k_source, tmp_path / "full")
    first = build_movielens_bundle(ml100k_source, tmp_path / "a", train_size=20, seed=1)
    build_movielens_bundle(ml100k_source, tmp_path / "b", train_size=20, seed=1)
    build_movielens_bundle(ml100k_source, tmp_path / "c", train_size=20, seed=2)
    assert first.counts["train"] == 20 and first.train_available == full.counts["train"]
    assert read_bytes(tmp_path / "a") == read_bytes(tmp_path / "b")
    full_lines = (tmp_path / "full" / "train.jsonl").read_text().splitlines()
    subset = (tmp_path / "a" / "train.jsonl").read_text().splitlines()
    assert subset == [line for line in full_lines if line in set(subset)]  # kept in order
    assert subset != (tmp_path / "c" / "train.jsonl").read_text().splitlines()
    for split in ("valid", "test"):
        full_split = (tmp_path / "full" / f"{split}.jsonl").read_bytes()
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == full_split
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["protocol"]["train_size"] == {
        "requested": 20,
        "actual": 20,
        "available": full.counts["train"],
    }
    everything = build_movielens_bundle(ml100k_source, tmp_path / "d", train_size=10**6)
    assert everything.counts["train"] == full.counts["train"]


def test_items_that_share_a_title_are_merged(tmp_path: Path, tiny_movielens: TinyMovieLens):
    """Item 2 gets item 1's title: its ratings become item 1's, and a user who rated both
    keeps the earlier one only."""
    from dataclasses import replace

    items = [
        replace(item, name="Movie 1", year=1971) if item.item_id == 2 else item
        for item in tiny_movielens.items
    ]
    data = replace(tiny_movielens, items=items)
    build_movielens_bundle(data.write(tmp_path / "src"), tmp_path / "out", history_len=HISTORY)
    bundle = Bundle.load(tmp_path / "out")
    assert "2" not in bundle.items and bundle.meta["protocol"]["merged_duplicate_titles"] == {
        "2": "1"
    }
    expected = {}
    for user, order in sequences(tiny_movielens).items():
        kept = list(dict.fromkeys("1" if item == "2" else item for item in order))
        expected[user] = kept
    for row in bundle.split("test"):
        assert [*row.history, row.target] == expected[row.user_id][-HISTORY - 1 :]
    assert all("2" not in row.history and row.target != "2" for row in bundle.split("train"))


def test_latest_windows_per_user(tmp_path: Path, ml100k_source: Path) -> None:
    full = build_movielens_bundle(ml100k_source, tmp_path / "full")
    latest = build_movielens_bundle(ml100k_source, tmp_path / "latest", latest_per_user=3)
    by_user = defaultdict(list)
    for row in Bundle.load(tmp_path / "full").split("train"):
        by_user[row.user_id].append(row.sample_id)
    expected = [sample for samples in by_user.values() for sample in samples[-3:]]
    kept = [row.sample_id for row in Bundle.load(tmp_path / "latest").split("train")]
    assert kept == expected and latest.counts["train"] == len(expected) < full.counts["train"]
    assert latest.train_available == len(expected)
    for split in ("valid", "test"):
        assert (tmp_path / "latest" / f"{split}.jsonl").read_bytes() == (
            tmp_path / "full" / f"{split}.jsonl"
        ).read_bytes()


def test_rebuild_is_byte_identical(tmp_path: Path, ml100k_source: Path) -> None:
    build_movielens_bundle(ml100k_source, tmp_path / "out", history_len=5)
    first = read_bytes(tmp_path / "out")
    build_movielens_bundle(ml100k_source, tmp_path / "out", history_len=5)
    assert read_bytes(tmp_path / "out") == first
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(first)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_same_bundle(
    layout: str, tmp_path: Path, tiny_bundle: Path, tiny_movielens: TinyMovieLens
) -> None:
    source = tiny_movielens.write(tmp_path / layout, layout)
    summary = build_movielens_bundle(source, tmp_path / "out", history_len=HISTORY)
    assert summary.layout == layout
    for name in BUNDLE_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (tiny_bundle / name).read_bytes(), name
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert sorted(meta["source"]["files"]) == sorted(path.name for path in source.iterdir())


# ----------------------------------------------------------------------------- bad inputs


def _replace_line(path: Path, line: int, text: str, encoding: str = "utf-8") -> None:
    lines = path.read_text(encoding=encoding).splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding=encoding)


BAD_INPUTS = [
    # (layout, file, line to replace or None to delete the file, new text, located at, message)
    ("grouplens-ml-100k", "u.user", None, "", "u.user", "file not found"),
    ("grouplens-ml-100k", "u.data", 3, "1\t2\t3", "u.data:3:", "expected 4 columns"),
    ("grouplens-ml-100k", "u.data", 5, "1\t2\t3\tsoon", "u.data:5:", "'timestamp': expected a"),
    ("grouplens-ml-100k", "u.data", 4, "1\t2\tgood\t9", "u.data:4:", "'rating': expected a"),
    ("grouplens-ml-100k", "u.data", 2, "1\t99\t3\t9", "u.data:2:", "item 99 has no row"),
    ("grouplens-ml-100k", "u.data", 6, "77\t2\t3\t9", "u.data:6:", "unknown user 77"),
    ("grouplens-ml-100k", "u.item", 2, "2||01-Jan-1972||x" + "|0" * 19, "u.item:2:", "empty title"),
    ("grouplens-ml-100k", "u.user", 3, "3|20|X|writer|1", "u.user:3:", "'gender'"),
    (
        "grouplens-ml-1m",
        "movies.dat",
        4,
        "4::Movie 4 (1974)",
        "movies.dat:4:",
        "expected 3 columns",
    ),
    ("grouplens-ml-1m", "users.dat", 2, "2::F::25::42::1", "users.dat:2:", "occupation code 42"),
    (
        "recbole-atomic",
        "ml-100k.inter",
        1,
        "user_id:token\titem_id:token",
        "ml-100k.inter:1:",
        "lacks",
    ),
]


@pytest.mark.parametrize(("layout", "file", "line", "text", "where", "message"), BAD_INPUTS)
def test_bad_input_names_file_and_line(
    layout: str,
    file: str,
    line: int | None,
    text: str,
    where: str,
    message: str,
    tmp_path: Path,
    tiny_movielens: TinyMovieLens,
) -> None:
    source = tiny_movielens.write(tmp_path / "source", layout)
    if line is None:
        (source / file).unlink()
    else:
        encoding = "latin-1" if file in ("u.item", "movies.dat") else "utf-8"
        _replace_line(source / file, line, text, encoding)
    with pytest.raises(InputError) as caught:
        build_movielens_bundle(source, tmp_path / "out")
    assert f"{source / where}" in str(caught.value)
    assert message in str(caught.value)


def test_folder_without_movielens_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no MovieLens files found"):
        build_movielens_bundle(tmp_path, tmp_path / "out")


# ----------------------------------------------------------------------------- fetching


def _fill_cache(data: TinyMovieLens) -> None:
    """Put the tiny source where a fetched recbole ML-100K would be cached."""
    folder = cache_dir() / "sources" / "ml-100k-recbole-1.2.1"
    data.write(folder, "recbole-atomic")
    (folder / PROVENANCE).write_text(json.dumps({"package": "recbole==1.2.1"}))


def test_cached_recbole_files_are_reused_without_pip(
    tmp_path: Path, tiny_movielens: TinyMovieLens, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill_cache(tiny_movielens)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # pip would fail
    summary = build_movielens_bundle(None, tmp_path / "out")
    assert summary.counts["items"] == 30
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["source"]["package"] == "recbole==1.2.1"
    assert sorted(meta["source"]["files"]) == sorted(ML100K_FILES)


def test_failed_download_suggests_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(InputError, match=r"could not download recbole==1\.2\.1 .*--source"):
        build_movielens_bundle(None, tmp_path / "out")


@pytest.mark.network
def test_real_movielens_100k_from_the_recbole_wheel(tmp_path: Path) -> None:
    summary = build_movielens_bundle(None, tmp_path / "out", train_size=1000)
    bundle = Bundle.load(tmp_path / "out")
    # 1,682 ids, of which 18 repeat another film's title (merged into the smaller id)
    merged = bundle.meta["protocol"]["merged_duplicate_titles"]
    assert len(merged) == 18 and merged["268"] == "246"  # "Chasing Amy (1997)"
    assert len(bundle.items) == 1682 - 18 and len(bundle.users) == 943
    titles = [item.title for item in bundle.items.values()]
    assert len(set(titles)) == len(titles)
    assert len(bundle.split("test")) == 943 == len(bundle.split("valid"))
    assert summary.popularity_sizes == [333, 333, 333, 333, 332]
    assert bundle.meta["groups"]["popularity_group"]["sizes"] == [333, 333, 333, 333, 332]
    assert bundle.items["1"].title == "Toy Story (1995)"
    assert bundle.items["267"].title == "unkonwn" and bundle.items["267"].attributes["year"] is None
    assert bundle.items["1412"].title == "Land Before Time III: The Time of the Great Giving (1995)"
    # a user who rated both copies of a film keeps the first rating: fewer interactions
    assert summary.train_available < 100_000 - 3 * 943


# ----------------------------------------------------------------------------- CLI


def test_cli_builds_a_bundle(
    tmp_path: Path, ml100k_source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["data", "movielens-100k", "--source", str(ml100k_source), "--out", str(tmp_path / "o")]
    code, out, _ = run_cli([*args, "--train-size", "25", "--history-len", "3"], capsys)
    assert code == 0
    assert "25 of" in out and "wrote movielens-100k bundle" in out
    bundle = Bundle.load(tmp_path / "o")
    assert len(bundle.split("train")) == 25
    assert max(len(row.history) for row in bundle.split("test")) == 3


def test_cli_error_is_one_line_exit_2(
    tmp_path: Path, ml100k_source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _replace_line(ml100k_source / "u.data", 7, "1\t2\t3\tlater")
    args = ["data", "movielens-100k", "--source", str(ml100k_source), "--out", str(tmp_path / "o")]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {ml100k_source / 'u.data'}:7: field 'timestamp': expected a number, got 'later'"
    ]


def test_cli_refuses_the_wrong_dataset(
    tmp_path: Path, ml100k_source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["data", "movielens-1m", "--source", str(ml100k_source), "--out", str(tmp_path / "o")]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "expected movielens-1m files, found movielens-100k" in err


@pytest.mark.parametrize(
    "command", [["data"], ["data", "movielens-100k"], ["data", "movielens-1m"]]
)
def test_cli_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli([*command, "--help"], capsys)
    assert code == 0
    expected = (
        ["movielens-100k", "movielens-1m"] if command == ["data"] else ["--out", "--train-size"]
    )
    assert all(word in out for word in expected)
