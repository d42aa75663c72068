"""`make demo`: an LLM recommender on MovieLens-100K, its popularity bias, and its repair.

Part 1, the recommender (the `fudlr` CLI): build the bundle, convert SmolLM2-135M-Instruct,
fine-tune a LoRA recommender on a training subset, recommend for every test user, print
the accuracy/fairness table, plot the group shares, say whether it is popularity-biased.

Part 2, the repair through the service: start `fudlr serve` (embedded: SQLite, a local
artifact folder, a filesystem broker, one worker), create an API key, register the
recommender (the worker builds its training-set index), submit a debias job, follow its
progress, download the repaired adapter, and measure it on the test split exactly like
the original.

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

from fudlr.fairness.plot import plot_group_shares
from fudlr.hashing import file_sha256
from fudlr.models.device import PRECISIONS, fast_precision

console = Console()
ROOT = Path(__file__).resolve().parent.parent
FUDLR = [sys.executable, "-m", "clients.cli"]


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
    """Whether the recommender over-serves popular items, K by K, in the metrics' own numbers.

    At K=1 the list is the grounded generation itself; deeper ranks are its nearest
    titles in the base model's embedding space, so the bias is sharpest at K=1.
    """
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
            "[bold red]The fine-tuned recommender is popularity-biased[/] at "
            f"K={', '.join(biased_at)}: it recommends the most popular items more often "
            "than its users watched them."
        )
    else:
        lines.append("[bold green]The most popular group is not over-recommended at any K.[/]")
    return "\n".join(lines)


def recommend_and_measure(
    args: argparse.Namespace, name: str, model: Path, adapter: Path, bundle: Path, work: Path
) -> Path:
    """Recommendations for every test user and their metrics JSON; returns its path."""
    recommendations, metrics = work / f"{name}-recommendations.jsonl", work / f"{name}-metrics.json"
    recommend_args = ["recommend", "--base-model", str(model), "--adapter", str(adapter)]
    recommend_args += ["--bundle", str(bundle), "--split", "test", "--out", str(recommendations)]
    recommend_args += ["--num-beams", str(args.num_beams), "--precision", args.precision]
    # the demo's own small recommender keeps the grounded protocol it was written for
    recommend_args += ["--decoding", "grounded", "--no-exclude-history"]
    weights = adapter / "adapter_model.safetensors"
    cli_step(f"recommend ({name})", recommend_args, recommendations, work, inputs=(weights,))
    metrics_args = ["metrics", "--bundle", str(bundle), "--split", "test", "--k", "1,5,10"]
    metrics_args += ["--recommendations", str(recommendations), "--out", str(metrics)]
    if name == "original":
        metrics_args += ["--plot", str(work / "popularity_shares.png")]
    fudlr(metrics_args)
    return metrics


def repair_through_the_service(
    args: argparse.Namespace, work: Path, model: Path, bundle: Path, adapter: Path
) -> Path | None:
    """Register, debias and download through the HTTP service; returns the repaired adapter."""
    from clients.embedded import embedded_service
    from clients.sdk import Client

    out = work / "repair"
    log = work / "service.log"
    console.print(f"$ fudlr serve --port {args.port}   (log: {log})", style="dim")
    with embedded_service(work / "service", args.port, log) as env:
        env["FUDLR_API_KEY"] = fudlr(["keys", "create", "--tenant", "demo"], env, capture=True)
        register = ["register", "--name", "movielens-smollm2", "--base-model", str(model)]
        register += ["--adapter", str(adapter), "--bundle", str(bundle), "--wait"]
        register += ["--decoding", "grounded"]
        register += ["--index-option", "curvature_samples=256"]
        register += ["--index-option", f"precision={args.precision}"]
        recommender = fudlr(register, env, capture=True)
        submit = ["submit", recommender, "--bias", args.bias, "--wait"]
        for option in (
            f"query_users={args.query_users}",
            "test_users=0",  # the test split is measured below, like the original
            f"num_beams={args.num_beams}",
            f"precision={args.precision}",
        ):
            submit += ["--option", option]
        try:
            job = fudlr(submit, env, capture=True)
        except subprocess.CalledProcessError:
            console.print(
                "[bold yellow]The job did not publish a repaired adapter (its reason is above):"
                " the guard found no step that lowers the bias within the accuracy budget."
            )
            return None
        fudlr(["download", recommender, "--out", str(out / "adapter")], env)
        with Client(env["FUDLR_URL"], env["FUDLR_API_KEY"]) as client:
            (out / "report.json").write_text(json.dumps(client.report(job), indent=2))
    return out / "adapter"


def comparison_table(before: dict, after: dict, report: dict) -> Table:
    """Per K: accuracy and popularity unfairness before and after, and what was predicted."""
    label = report["biases"][0]
    table = Table(
        title=f"{label}: {len(report['selected'])} of {report['training_samples']} training "
        f"samples unlearned, eta {report['eta']} (test split)"
    )
    for column in ("K", "NDCG", "HR", "MGU", "DGU", "GU most popular"):
        table.add_column(column, justify="right")
    for k in before["k"]:
        b, a = before["k"][k], after["k"][k]
        top = sorted(b["GU"], key=int)[-1]
        cells = [f"{b[name]:.4f} → {a[name]:.4f}" for name in ("NDCG", "HR", "MGU", "DGU")]
        table.add_row(k, *cells, f"{b['GU'][top]:+.4f} → {a['GU'][top]:+.4f}")
    predicted, valid = report["predicted"], report["metrics"]["valid"]
    table.caption = (
        f"predicted by the influence model (surrogate): {predicted[label + ':before']:.4f} → "
        f"{predicted[label + ':after']:.4f}; validation guard: "
        f"{valid['before']['biases'][label]:.4f} → {valid['after']['biases'][label]:.4f}"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".fudlr-demo", help="output folder")
    parser.add_argument("--train-size", type=int, default=1500, help="training windows")
    parser.add_argument(
        "--history-len", type=int, default=5, help="history items per prompt (10 = 2x slower)"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", default="3e-3")
    precision = fast_precision()  # reads the CPU's flags (and imports torch): once
    parser.add_argument(
        "--num-beams",
        type=int,
        default=5 if precision == "bf16" else 1,
        help="beam width of generation (default: 5 where bf16 is native, else greedy: 5x "
        "cheaper on a small CPU, and only the top generation is grounded)",
    )
    parser.add_argument(
        "--precision",
        default=precision,
        choices=PRECISIONS,
        help="default: bf16 where the hardware has native bf16 matmuls, else fp32",
    )
    parser.add_argument("--bias", default="item:popularity_group:MGU@1", help="the repair's target")
    parser.add_argument("--query-users", type=int, default=64, help="users behind the queries")
    parser.add_argument("--port", type=int, default=8765, help="port of the demo's service")
    parser.add_argument("--no-repair", action="store_true", help="stop after the recommender")
    args = parser.parse_args()

    work: Path = args.work
    bundle, store = work / "bundle", work / "models"
    model = store / "smollm2-135m-instruct"
    adapter = work / "adapter"
    started = time.perf_counter()

    data_args = ["data", "movielens-100k", "--out", str(bundle)]
    data_args += ["--train-size", str(args.train_size), "--history-len", str(args.history_len)]
    cli_step("bundle", data_args, bundle / "meta.json", work)
    cli_step("model", ["models", "smollm2-135m", "--store", str(store)], model, work)
    train_args = ["train", "--base-model", str(model), "--bundle", str(bundle)]
    train_args += ["--out", str(adapter), "--epochs", str(args.epochs)]
    train_args += ["--learning-rate", args.learning_rate, "--precision", args.precision]
    weights = adapter / "adapter_model.safetensors"
    cli_step("train", train_args, weights, work, inputs=(bundle / "train.jsonl",))
    console.rule("[bold]metrics (test split, popularity groups 0 = least popular, gender gap)")
    before = recommend_and_measure(args, "original", model, adapter, bundle, work)
    console.rule("[bold]verdict")
    console.print(bias_verdict(json.loads(before.read_text())))
    console.print(f"plot: {work / 'popularity_shares.png'}")

    if not args.no_repair:
        repaired = work / "repair" / "adapter"
        key = [args.bias, args.query_users, args.num_beams, args.precision, file_sha256(weights)]

        def repair() -> None:
            if repair_through_the_service(args, work, model, bundle, adapter) is None:
                raise SystemExit(0)

        step(
            "repair through the service", key, repaired / "adapter_model.safetensors", work, repair
        )
        after = recommend_and_measure(args, "repaired", model, repaired, bundle, work)
        report = json.loads((work / "repair" / "report.json").read_text())
        before_metrics, after_metrics = (
            json.loads(before.read_text()),
            json.loads(after.read_text()),
        )
        console.rule("[bold]repair: the original against the repaired adapter")
        console.print(comparison_table(before_metrics, after_metrics, report))
        k = args.bias.rsplit("@", 1)[1].split("*")[0]
        plot = work / "repair_shares.png"
        plot_group_shares(
            before_metrics["k"][k]["GH"],
            {"original": before_metrics["k"][k]["GP"], "repaired": after_metrics["k"][k]["GP"]},
            title=f"popularity groups at K={k}: history vs recommendations (test split)",
            path=plot,
            xlabel="popularity group (0 = least popular)",
        )
        console.print(f"plot: {plot}")
    console.print(f"all outputs: {work}\ndemo took {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
