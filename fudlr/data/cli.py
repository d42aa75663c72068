"""`fudlr data ...`: build data bundles from MovieLens (kept free of torch, so it starts fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fudlr.console import console
from fudlr.data.builder import BundleSummary, build_movielens_bundle

app = typer.Typer(
    help="Build data bundles (items, users, train/valid/test, meta.json) from MovieLens.",
    no_args_is_help=True,
)

Out = Annotated[
    Path, typer.Option("--out", help="Folder to write the bundle to (created if absent).")
]
TrainSize = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Keep a seeded random subset of this many train windows (default: all of them).",
    ),
]
Seed = Annotated[int, typer.Option(help="Seed of the --train-size subset.")]
HistoryLen = Annotated[
    int, typer.Option(min=1, help="Most items in a sample's history (the latest ones).")
]
MinRating = Annotated[
    float, typer.Option(help="Drop interactions rated below this before splitting.")
]
LatestPerUser = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Keep only each user's latest N train windows, closest in time to valid/test "
        "(default: all; --train-size then subsamples what is kept).",
    ),
]


@app.command("movielens-100k")
def movielens_100k(
    out: Out,
    source: Annotated[
        Path | None,
        typer.Option(
            help="Folder with GroupLens ml-100k (u.data, u.item, u.user) or RecBole atomic "
            "files; default: fetch them from the recbole 1.2.1 wheel on PyPI (cached)."
        ),
    ] = None,
    train_size: TrainSize = None,
    seed: Seed = 0,
    history_len: HistoryLen = 10,
    min_rating: MinRating = 0.0,
    latest_per_user: LatestPerUser = None,
) -> None:
    """Build the MovieLens-100K bundle: 1,664 items (titles listed twice merged), 943 users,
    one valid and test row each."""
    _build(
        source, out, "movielens-100k", train_size, seed, history_len, min_rating, latest_per_user
    )


@app.command("movielens-1m")
def movielens_1m(
    source: Annotated[
        Path,
        typer.Option(
            help="Folder with GroupLens ml-1m (ratings.dat, movies.dat, users.dat) or "
            "RecBole atomic ml-1m files."
        ),
    ],
    out: Out,
    train_size: TrainSize = None,
    seed: Seed = 0,
    history_len: HistoryLen = 10,
    min_rating: MinRating = 0.0,
    latest_per_user: LatestPerUser = None,
) -> None:
    """Build the MovieLens-1M bundle from a local copy (it is not on PyPI)."""
    _build(source, out, "movielens-1m", train_size, seed, history_len, min_rating, latest_per_user)


def _build(
    source: Path | None,
    out: Path,
    dataset: str,
    train_size: int | None,
    seed: int,
    history_len: int,
    min_rating: float,
    latest_per_user: int | None,
) -> None:
    summary = build_movielens_bundle(
        source,
        out,
        dataset=dataset,
        train_size=train_size,
        seed=seed,
        history_len=history_len,
        min_rating=min_rating,
        latest_per_user=latest_per_user,
        verbose=True,
    )
    console.print(_table(summary))
    console.print(f"wrote {summary.name} bundle to {summary.out_dir}")


def _table(summary: BundleSummary) -> Table:
    counts = summary.counts
    table = Table(title=f"{summary.name} ({summary.layout})", title_justify="left")
    table.add_column("rows")
    table.add_column("count", justify="right")
    table.add_row("items", f"{counts['items']:,}")
    table.add_row("users", f"{counts['users']:,}")
    table.add_row("train", f"{counts['train']:,} of {summary.train_available:,} windows")
    table.add_row("valid", f"{counts['valid']:,}")
    table.add_row("test", f"{counts['test']:,}")
    table.add_row("users without valid/test", f"{counts['users_skipped']:,}")
    table.add_row(
        "popularity group sizes (0 = least)", " / ".join(str(n) for n in summary.popularity_sizes)
    )
    table.add_row(
        "  max interactions per group",
        " / ".join(str(n) for n in summary.popularity_thresholds),
    )
    return table
