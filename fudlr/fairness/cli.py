"""`fudlr metrics`: score a recommendations file for accuracy and fairness, print or plot it.

The tables are public so that demo and benchmark scripts print metrics the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fudlr.data.bundle import Bundle, subset
from fudlr.data.schema import SPLITS
from fudlr.errors import InputError
from fudlr.fairness.metrics import (
    DEFAULT_ITEM_ATTRIBUTE,
    DEFAULT_KS,
    DEFAULT_USER_ATTRIBUTE,
    chosen_k,
    evaluate,
    load_recommendations,
)


def metrics(
    bundle: Annotated[Path, typer.Option(help="Data bundle directory.")],
    recommendations: Annotated[
        Path, typer.Option(help="JSONL rows: user_id and items (item ids, best first).")
    ],
    split: Annotated[str, typer.Option(help="Split whose rows are evaluated.")] = "test",
    k: Annotated[str, typer.Option("--k", help="Comma-separated K values.")] = ",".join(
        map(str, DEFAULT_KS)
    ),
    item_groups: Annotated[
        str, typer.Option(help="Item attribute that defines item groups.")
    ] = DEFAULT_ITEM_ATTRIBUTE,
    user_groups: Annotated[
        str, typer.Option(help="User attribute that defines user groups.")
    ] = DEFAULT_USER_ATTRIBUTE,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON report here.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG of historical vs recommended group shares.")
    ] = None,
    plot_k: Annotated[int | None, typer.Option(help="K of the plot (default: largest).")] = None,
    users: Annotated[
        int | None,
        typer.Option(
            min=1, help="Only the fixed-seed subset of this many users `fudlr recommend` took."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --users subset.")] = 0,
) -> None:
    """Accuracy (NDCG@K, HR@K) and fairness (GU/MGU/DGU, user-group NDCG gap) of top-K lists."""
    if split not in SPLITS:
        raise InputError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    ks = parse_ks(k)
    loaded = Bundle.load(bundle, splits=(split,))
    rankings = load_recommendations(recommendations, loaded)
    rows = subset(loaded.split(split), users, seed)
    report = evaluate(
        loaded, split, rankings, ks, item_groups, user_groups, source=recommendations, rows=rows
    )
    if plot is not None:
        from fudlr.fairness.plot import plot_report  # matplotlib, only when asked to plot

        plot_report(report, plot, plot_k)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(report))
        return
    console = Console()
    console.print(metric_table(report))
    console.print(group_table(report))
    if report["users_without_user_group"]:
        console.print(
            f"{report['users_without_user_group']} evaluated users lack '{user_groups}' "
            "and are left out of the user gap"
        )
    for written in (plot, out):
        if written is not None:
            console.print(f"wrote {written}")


def parse_ks(text: str) -> list[int]:
    """'1,5,10' -> [1, 5, 10]; range checks are left to `evaluate`."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise InputError(f"--k expects comma-separated integers, got '{text}'") from None


def metric_table(report: Mapping[str, Any], title: str | None = None) -> Table:
    """One row per K: accuracy, item-side unfairness and the user-group NDCG gap."""
    table = Table(
        title=title
        or f"{report['split']}: {report['users']} users, item groups '{report['item_groups']}'"
    )
    for column in ("K", "NDCG", "HR", "MGU", "DGU", f"{report['user_groups']} gap (NDCG)"):
        table.add_column(column, justify="right")
    for k, at_k in report["k"].items():
        values = (at_k[name] for name in ("NDCG", "HR", "MGU", "DGU"))
        table.add_row(k, *map(_number, values), _number(at_k["user_gap"]["NDCG"]))
    return table


def group_table(report: Mapping[str, Any], k: int | None = None) -> Table:
    """Per item group at one K (default: largest): GH, GP@K and GU@K = GP - GH."""
    k = chosen_k(report, k)
    at_k = report["k"][str(k)]
    table = Table(title=f"{report['item_groups']} shares at K={k}")
    table.add_column("group")
    for column in ("GH", f"GP@{k}", f"GU@{k}"):
        table.add_column(column, justify="right")
    for name, history in at_k["GH"].items():
        table.add_row(name, _number(history), _number(at_k["GP"][name]), _number(at_k["GU"][name]))
    return table


def _number(value: float) -> str:
    return f"{value:.4f}"
