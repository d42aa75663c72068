"""Bar charts of group shares: history against one or more recommenders (e.g. before/after).

Uses matplotlib's Figure with the Agg canvas directly, never pyplot, so plotting has no
global state and works in worker threads and on machines without a display.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fudlr.fairness.metrics import chosen_k

HISTORY_LABEL = "history (GH)"


def plot_group_shares(
    history_share: Mapping[str, float],
    recommended: Mapping[str, Mapping[str, float]],
    *,
    title: str,
    path: str | Path,
    xlabel: str = "group",
    dpi: int = 150,
) -> Path:
    """Grouped bars per group: the historical share, then each system's recommended share.

    recommended: system label (e.g. "before repair, GP@10") -> group -> share; every system
    must cover exactly the groups of `history_share`, which also fixes their order.
    """
    names = list(history_share)
    for label, shares in recommended.items():
        if set(shares) != set(names):
            raise ValueError(f"'{label}' covers groups {sorted(shares)}, history covers {names}")
    series = {HISTORY_LABEL: history_share, **recommended}
    width = 0.8 / len(series)
    figure = Figure(figsize=(min(16.0, max(6.0, 0.4 * len(names) * len(series))), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (label, shares) in enumerate(series.items()):
        offset = (index - (len(series) - 1) / 2) * width
        positions = [position + offset for position in range(len(names))]
        axes.bar(positions, [shares[name] for name in names], width, label=label)
    if max(len(name) for name in names) > 6:
        axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    else:
        axes.set_xticks(range(len(names)), names)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("share of group memberships")
    axes.set_title(title)
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def plot_report(report: Mapping[str, Any], path: str | Path, k: int | None = None) -> Path:
    """Plot one `evaluate` report: GH against GP@K, for the largest K unless `k` is given."""
    k = chosen_k(report, k)
    at_k = report["k"][str(k)]
    return plot_group_shares(
        at_k["GH"],
        {f"recommended top-{k} (GP@{k})": at_k["GP"]},
        title=f"{report['item_groups']} shares on split '{report['split']}'\n"
        f"history vs top-{k} recommendations",
        path=path,
        xlabel=report["item_groups"],
    )
