"""`make demo`: the reference recommender's popularity bias, and its repair through the service.

Part 1, the recommender (the `fudlr` CLI): build the reference recipe's MovieLens-100K
bundle, convert SmolLM2-135M-Instruct, take the committed reference adapter (`--train`
retrains it by its recipe), recommend for a fixed subset of test users with the recipe's
constrained decoding, print the accuracy/fairness table, plot the group shares, say where
the recommender over-serves popular items.

Part 2, the repair through the service: start `fudlr serve` (embedded: SQLite, a local
artifact folder, a filesystem broker, one worker), create an API key, register the
recommender (the worker indexes a fixed subset of its training windows), submit a debias
job, follow its progress, download version 2, and measure it on the same test users with
the same decoding; the change of each metric comes with its paired bootstrap interval.

Each step records its arguments and the digests of its inputs; a second run reuses
every step that is still current (`make clean` starts over).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.reference import ADAPTER, Recipe
from fudlr.fairness.plot import plot_group_shares
from fudlr.hashing import file_sha256
from fudlr.models.device import PRECISIONS, fast_precision

console = Console()
ROOT = Path(__file__).resolve().parent.parent
FUDLR = [sys.executable, "-m", "clients.cli"]
KS = (1, 5, 10)
RECIPE = Recipe.load()  # bundle, training and decoding of the reference recommender


def fudlr(args: list[str], env: dict[str, str] | None = None, capture: bool = False) -> str:
    """Run one `fudlr` command, showing it. With `capture`, its stdout's last line (an id or
    a key) is returned and the lines before it are shown."""
    console.print(f"$ fudlr {shlex.join(args)}", style="dim", soft_wrap=True)
    result = subprocess.run(
        [*FUDLR, *args],
        check=True,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE if capture else None,
        text=True,
    )
    if not capture:
        return ""
    *shown, last = result.stdout.rstrip("\n").splitlines() or [""]
    if shown:
        print("\n".join(shown))
    return last.strip()


def step(name: str, key: list, output: Path, work: Path, action: Callable[[], None]) -> None:
    """Run `action` unless `output` exists from a run with the same key (args, input digests)."""
    stamp = work / "stamps" / f"{name}.json"
    digest = hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()
    if stamp.is_file() and output.exists():
        recorded = json.loads(stamp.read_text())
        if recorded["key"] == digest:
            seconds = recorded["seconds"]
            console.print(f"[green]✓[/] {name}: reusing {output} (took {seconds:.0f}s when built)")
            return
    console.rule(f"[bold]{name}")
    started = time.perf_counter()
    action()
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"key": digest, "seconds": time.perf_counter() - started}))


def cli_step(name: str, args: list[str], output: Path, work: Path, inputs: tuple = ()) -> None:
    """A step that is one `fudlr` command; `inputs` are files whose content it depends on."""
    key = [args, [file_sha256(path) for path in inputs]]
    step(name, key, output, work, lambda: fudlr(args))


def bias_verdict(metrics: dict) -> str:
    """Whether the recommender over-serves popular items, K by K, in the metrics' own numbers."""
    lines, biased_at = [], []
    for k, at_k in metrics["k"].items():
        top = sorted(at_k["GU"], key=int)[-1]
        gu = at_k["GU"][top]
        lines.append(
            f"K={k:>2}: MGU {at_k['MGU']:.4f}  DGU {at_k['DGU']:.4f}  most popular group ({top}): "
            f"{at_k['GP'][top]:.1%} of recommendations vs {at_k['GH'][top]:.1%} of histories "
            f"(GU {gu:+.4f})"
        )
        if gu > 0:
            biased_at.append(k)
    if biased_at:
        lines.append(
            "[bold red]The recommender is popularity-biased[/] at "
            f"K={', '.join(biased_at)}: it recommends the most popular items more often "
            "than its users watched them."
        )
    else:
        lines.append("[bold green]The most popular group is not over-recommended at any K.[/]")
    return "\n".join(lines)


def recommend_and_measure(
    args: argparse.Namespace, name: str, model: Path, adapter: Path, bundle: Path, work: Path
) -> tuple[Path, Path]:
    """Recommendations for the demo's test users and their metrics JSON (paths)."""
    recommendations, metrics = work / f"{name}-recommendations.jsonl", work / f"{name}-metrics.json"
    decoding = RECIPE.recommend
    users = ["--users", str(args.test_users), "--seed", "0"]
    recommend_args = ["recommend", "--base-model", str(model), "--adapter", str(adapter)]
    recommend_args += ["--bundle", str(bundle), "--split", "test", "--out", str(recommendations)]
    recommend_args += ["--decoding", str(decoding.decoding), "--num-beams", str(args.num_beams)]
    recommend_args += ["--top", str(max(KS)), "--precision", args.precision, *users]
    weights = adapter / "adapter_model.safetensors"
    cli_step(f"recommend ({name})", recommend_args, recommendations, work, inputs=(weights,))
    metrics_args = ["metrics", "--bundle", str(bundle), "--split", "test"]
    metrics_args += ["--k", ",".join(map(str, KS)), "--recommendations", str(recommendations)]
    metrics_args += ["--out", str(metrics), *users]
    if name == "original":
        metrics_args += ["--plot", str(work / "popularity_shares.png")]
    fudlr(metrics_args)
    return recommendations, metrics


def repair_through_the_service(
    args: argparse.Namespace, work: Path, model: Path, bundle: Path, adapter: Path
) -> Path | None:
    """Register, debias and download through the HTTP service; returns the repaired adapter."""
    from clients.embedded import embedded_service
    from clients.sdk import ApiError, Client

    out = work / "repair"
    log = work / "service.log"
    console.print(f"$ fudlr serve --port {args.port}   (log: {log})", style="dim")
    with embedded_service(work / "service", args.port, log) as env:
        env["FUDLR_API_KEY"] = fudlr(["keys", "create", "--tenant", "demo"], env, capture=True)
        register = ["register", "--name", "movielens-smollm2", "--base-model", str(model)]
        register += ["--adapter", str(adapter), "--bundle", str(bundle), "--wait"]
        register += ["--decoding", str(RECIPE.recommend.decoding)]
        for option in (
            f"candidates={args.candidates}",
            f"curvature_samples={args.curvature_samples}",
            f"batch_size={RECIPE.train.batch_size}",
            f"precision={args.precision}",
        ):
            register += ["--index-option", option]
        recommender = fudlr(register, env, capture=True)
        submit = ["submit", recommender, "--bias", args.bias]
        for option in (
            f"query_users={args.query_users}",
            f"guard_users={args.guard_users}",
            "test_users=0",  # the test users are measured below, like the original
            f"num_beams={args.num_beams}",
            f"precision={args.precision}",
        ):
            submit += ["--option", option]
        job = fudlr(submit, env, capture=True)
        try:
            fudlr(["wait", job], env)
        except subprocess.CalledProcessError:
            published = False
        else:
            published = True
            fudlr(["download", recommender, "--out", str(out / "adapter")], env)
        with Client(env["FUDLR_URL"], env["FUDLR_API_KEY"]) as client:
            try:
                report = client.report(job)
            except ApiError as error:  # it failed before it could judge anything
                console.print(f"[bold red]The job {job} ended without a report: {error}[/]")
                return None
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        console.print(stage_seconds(report))
        if not published:
            console.print(
                f"[bold yellow]The job published no repaired adapter: {report['reason']}[/]\n"
                "A selection test or a guard needs users to resolve an effect: more "
                f"--query-users, --guard-users or --candidates give it more "
                f"(its report: {out / 'report.json'})."
            )
            return None
    return out / "adapter"


def stage_seconds(report: dict) -> Table:
    """Where the job's time went, stage by stage (the report's `seconds`)."""
    table = Table(title="the job's stages")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in report["seconds"].items():
        table.add_row(stage, f"{seconds:.0f}")
    table.add_row("[bold]total", f"[bold]{sum(report['seconds'].values()):.0f}")
    return table


def changes(bundle_dir: Path, before: Path, after: Path, users: int, k: int) -> dict[str, dict]:
    """Paired bootstrap intervals (95%) of the test users' change in NDCG@10 and in MGU@k."""
    from fudlr.data.bundle import Bundle, subset
    from fudlr.fairness.bootstrap import paired_change, paired_difference
    from fudlr.fairness.metrics import evaluate, load_recommendations, ndcg_at_k

    bundle = Bundle.load(bundle_dir)
    rows = subset(bundle.split("test"), users, 0)
    lists = [load_recommendations(path, bundle) for path in (before, after)]
    accuracy = [
        [ndcg_at_k(ranked[row.user_id], row.target, max(KS)) for row in rows] for ranked in lists
    ]

    def mgu(ranked: dict[str, list[str]]) -> Callable[[list], float]:
        return lambda sample: evaluate(bundle, "test", ranked, [k], rows=sample)["k"][str(k)]["MGU"]

    return {
        f"NDCG@{max(KS)}": paired_difference(*accuracy).describe(),
        f"MGU@{k}": paired_change(rows, mgu(lists[0]), mgu(lists[1]), resamples=500).describe(),
    }


def comparison_table(before: dict, after: dict, report: dict, intervals: dict) -> Table:
    """Per K: accuracy (with hit counts) and popularity unfairness before and after."""
    label = report["biases"][0]
    users = before["users"]
    table = Table(
        title=f"{label}: {len(report['selected'])} of {report['candidates']} candidate "
        f"training windows unlearned, eta {report['eta']} ({users} test users)"
    )
    for column in ("K", "NDCG", "hits", "MGU", "DGU", "GU most popular"):
        table.add_column(column, justify="right")
    for k in before["k"]:
        b, a = before["k"][k], after["k"][k]
        top = sorted(b["GU"], key=int)[-1]
        hits = f"{round(b['HR'] * users)} → {round(a['HR'] * users)}"
        cells = [f"{b[name]:.4f} → {a[name]:.4f}" for name in ("MGU", "DGU")]
        ndcg = f"{b['NDCG']:.4f} → {a['NDCG']:.4f}"
        table.add_row(k, ndcg, hits, *cells, f"{b['GU'][top]:+.4f} → {a['GU'][top]:+.4f}")
    valid = report["metrics"]["valid"]
    lines = [
        f"change {name}: {c['mean']:+.4f}, 95% paired interval [{c['low']:+.4f}, {c['high']:+.4f}]"
        for name, c in intervals.items()
    ]
    lines.append(
        f"the job's guard ({valid['before']['users']} validation users): "
        f"{valid['before']['biases'][label]:.4f} → {valid['after']['biases'][label]:.4f}"
    )
    table.caption = "\n".join(lines)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".fudlr-demo", help="output folder")
    parser.add_argument(
        "--train", action="store_true", help="retrain the reference adapter by its recipe"
    )
    parser.add_argument(
        "--test-users", type=int, default=200, help="test users measured before and after"
    )
    parser.add_argument(
        "--num-beams", type=int, default=RECIPE.recommend.num_beams, help="constrained beams"
    )
    parser.add_argument(
        "--precision",
        default=fast_precision(),
        choices=PRECISIONS,
        help="default: bf16 where the hardware has native bf16 matmuls, else fp32",
    )
    parser.add_argument("--bias", default="item:popularity_group:MGU@5", help="the repair's target")
    parser.add_argument(
        "--candidates", type=int, default=1000, help="training windows the index holds"
    )
    parser.add_argument(
        "--curvature-samples", type=int, default=256, help="windows the curvature is fitted on"
    )
    parser.add_argument("--query-users", type=int, default=128, help="users behind the queries")
    parser.add_argument("--guard-users", type=int, default=256, help="users the guard measures")
    parser.add_argument("--port", type=int, default=8765, help="port of the demo's service")
    parser.add_argument("--no-repair", action="store_true", help="stop after the recommender")
    args = parser.parse_args()

    work: Path = args.work
    console.print(
        f"plan: the reference adapter's popularity bias on {args.test_users} test users, then "
        f"a job for {args.bias}: {args.candidates} training windows indexed (curvature on "
        f"{args.curvature_samples}), {args.query_users} query and {args.guard_users} guard "
        f"users, {args.num_beams} beams, {args.precision}; then the same test users again"
    )
    bundle, store = work / "bundle", work / "models"
    model = store / "smollm2-135m-instruct"
    started = time.perf_counter()

    cut = RECIPE.bundle
    data_args = ["data", "movielens-100k", "--out", str(bundle), "--seed", str(cut.seed)]
    data_args += ["--history-len", str(cut.history_len)]
    data_args += ["--latest-per-user", str(cut.latest_per_user)]
    if cut.train_size is not None:
        data_args += ["--train-size", str(cut.train_size)]
    cli_step("bundle", data_args, bundle / "meta.json", work)
    cli_step("model", ["models", "smollm2-135m", "--store", str(store)], model, work)
    adapter = ADAPTER
    if args.train:
        from bench.reference import train

        adapter = work / "adapter"
        key = [RECIPE.describe(), file_sha256(bundle / "train.jsonl")]
        step(
            "train (the reference recipe)",
            key,
            adapter / "adapter_model.safetensors",
            work,
            lambda: train(RECIPE, adapter, bundle, model),
        )
    console.rule("[bold]metrics (test users, popularity groups 0 = least popular, gender gap)")
    before_lists, before = recommend_and_measure(args, "original", model, adapter, bundle, work)
    console.rule("[bold]verdict")
    console.print(bias_verdict(json.loads(before.read_text())))
    console.print(f"plot: {work / 'popularity_shares.png'}")

    if not args.no_repair:
        repaired = work / "repair" / "adapter"
        key = [
            args.bias,
            args.candidates,
            args.curvature_samples,
            args.query_users,
            args.guard_users,
            args.num_beams,
            args.precision,
            file_sha256(adapter / "adapter_model.safetensors"),
        ]

        def repair() -> None:
            if repair_through_the_service(args, work, model, bundle, adapter) is None:
                raise SystemExit(0)

        step(
            "repair through the service", key, repaired / "adapter_model.safetensors", work, repair
        )
        after_lists, after = recommend_and_measure(args, "repaired", model, repaired, bundle, work)
        report = json.loads((work / "repair" / "report.json").read_text())
        before_metrics, after_metrics = (
            json.loads(before.read_text()),
            json.loads(after.read_text()),
        )
        k = args.bias.rsplit("@", 1)[1].split("*")[0]
        intervals = changes(bundle, before_lists, after_lists, args.test_users, int(k))
        console.rule("[bold]repair: the original against the repaired adapter")
        console.print(comparison_table(before_metrics, after_metrics, report, intervals))
        plot = work / "repair_shares.png"
        plot_group_shares(
            before_metrics["k"][k]["GH"],
            {"original": before_metrics["k"][k]["GP"], "repaired": after_metrics["k"][k]["GP"]},
            title=f"popularity groups at K={k}: history vs recommendations (test users)",
            path=plot,
            xlabel="popularity group (0 = least popular)",
        )
        console.print(f"plot: {plot}")
    console.print(f"all outputs: {work}\ndemo took {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
