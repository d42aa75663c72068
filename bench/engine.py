"""Engine benchmark: is influence cheap next to training, and a job cheap next to retraining?

On one model and bundle, in one run:
1. throughput: tokens/s of plain LoRA training steps vs the index's scoring pass (per-
   sample gradients of every training sample) on the same samples, batch size and
   precision. Target: scoring >= 0.8x training.
2. cost: wall time of a debias job with its index built vs one retraining of the same
   recipe (the adapter's own training run). Target: job <= 1/10 of retraining.
Writes bench/results/engine-<profile>-<date>-<commit>.json and prints a table. `--quick` is
a smoke run.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import RESULTS, ROOT, commit, machine, prepare_movielens, prepare_smollm2
from fudlr.control import Control
from fudlr.data.bundle import Bundle
from fudlr.influence.gradients import compute_sample_gradients
from fudlr.influence.index import IndexConfig, build_index
from fudlr.influence.layout import ParameterLayout
from fudlr.influence.tracker import lora_linears
from fudlr.models.device import PRECISIONS, fast_precision
from fudlr.models.lora import load_adapter
from fudlr.models.store import load_base_model
from fudlr.recommender.encoding import encode_sample
from fudlr.recommender.recommend import RecommendConfig
from fudlr.recommender.train import TrainConfig, train_adapter
from fudlr.repair.config import DebiasConfig, MaskConfig
from fudlr.repair.pipeline import DebiasJob, RepairRejected
from fudlr.repair.spec import BiasSpec

console = Console()
PROFILES = {
    # training windows, samples timed for throughput, users behind queries / guard
    "quick": {"train_size": 96, "throughput_samples": 32, "query_users": 16, "guard_users": 32},
    "full": {"train_size": 1500, "throughput_samples": 256, "query_users": 128, "guard_users": 256},
}


def prompt_tokens(tokenizer, samples) -> list:
    return [encode_sample(tokenizer, s.prompt, s.completion, 256) for s in samples]


def scoring_tokens_per_second(
    model_dir: Path, adapter: Path, samples: list, precision: str
) -> float:
    """Tokens/s of the per-sample-gradient pass (what the index and scoring run) on `samples`."""
    base, tokenizer = load_base_model(model_dir)
    model = load_adapter(base, adapter, trainable=True)
    linears = lora_linears(model)
    encoded = prompt_tokens(tokenizer, samples)
    started = time.perf_counter()
    for _ in compute_sample_gradients(
        model,
        linears,
        ParameterLayout.of(linears),
        encoded,
        batch_size=8,
        pad_id=tokenizer.pad_token_id,
        control=Control(),
        precision=precision,
    ):
        pass
    return sum(len(e.input_ids) for e in encoded) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke profile (minutes)")
    parser.add_argument("--work", type=Path, default=ROOT / ".fudlr-bench")
    parser.add_argument(
        "--precision",
        default=fast_precision(),
        choices=PRECISIONS,
        help="default: bf16 where the hardware has native bf16 matmuls, else fp32",
    )
    parser.add_argument("--bias", default="item:popularity_group:MGU@1")
    args = parser.parse_args()
    profile_name = "quick" if args.quick else "full"
    profile = PROFILES[profile_name]
    work: Path = args.work / profile_name
    console.rule(f"engine benchmark ({profile_name} profile)")

    bundle = Bundle.load(prepare_movielens(work / "bundle", profile["train_size"], 5))
    model_dir = prepare_smollm2(args.work / "models", console.print)
    recipe = TrainConfig(learning_rate=3e-3, precision=args.precision)

    # 1. throughput on the same samples, batch size and precision
    count = profile["throughput_samples"]
    probe_recipe = TrainConfig(**{**recipe.__dict__, "max_samples": count})
    probe = train_adapter(model_dir, bundle, work / "probe", probe_recipe)
    probe_ids = set(json.loads((work / "probe" / "fudlr-train.json").read_text())["sample_ids"])
    probe_samples = [s for s in bundle.split("train") if s.sample_id in probe_ids]
    _, tokenizer = load_base_model(model_dir)
    tokens = sum(len(e.input_ids) for e in prompt_tokens(tokenizer, probe_samples))
    training_tps = tokens / probe.seconds
    scoring_tps = scoring_tokens_per_second(
        model_dir, work / "probe", probe_samples, args.precision
    )

    # 2. the recipe's training run (= what retraining costs), the index, the job
    adapter = work / "adapter"
    training = train_adapter(model_dir, bundle, adapter, recipe)
    started = time.perf_counter()
    index_config = IndexConfig(curvature_samples=256, precision=args.precision)
    build_index(model_dir, adapter, bundle, work / "index", index_config)
    index_seconds = time.perf_counter() - started
    config = DebiasConfig(
        biases=(BiasSpec.parse(args.bias),),
        mask=MaskConfig(),
        query_users=profile["query_users"],
        guard_users=profile["guard_users"],
        test_users=0,
        recommend=RecommendConfig(num_beams=5, precision=args.precision),
    )
    started = time.perf_counter()
    outcome = "accepted"
    try:
        job = DebiasJob(model_dir, adapter, bundle, work / "index", config)
        report = job.run(work / "job")
        stages = report["seconds"]
    except RepairRejected as rejected:
        outcome, stages = f"rejected: {rejected}", job.timings
    job_seconds = time.perf_counter() - started

    results = {
        "benchmark": "engine",
        "profile": profile_name,
        "date": date.today().isoformat(),
        "commit": commit(),
        "machine": machine(),
        "train_size": len(bundle.split("train")),
        "precision": args.precision,
        "throughput": {
            "samples": count,
            "training_tokens_per_second": training_tps,
            "scoring_tokens_per_second": scoring_tps,
            "ratio": scoring_tps / training_tps,
            "target": 0.8,
            "met": scoring_tps / training_tps >= 0.8,
        },
        "cost": {
            "retraining_seconds": training.seconds,
            "index_seconds": index_seconds,
            "job_seconds": job_seconds,
            "job_stages": stages,
            "job_outcome": outcome,
            "ratio": job_seconds / training.seconds,
            "target": 0.1,
            "met": job_seconds / training.seconds <= 0.1,
        },
    }
    out_dir = RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"engine-{profile_name}-{results['date']}-{results['commit']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"engine-{profile_name}-latest.json").write_text(
        json.dumps(results, indent=2) + "\n"
    )

    table = Table(title=f"engine benchmark, {profile_name}, n={results['train_size']}")
    for column in ("measure", "value", "target", "met"):
        table.add_column(column)
    t, c = results["throughput"], results["cost"]
    table.add_row("training tokens/s", f"{t['training_tokens_per_second']:.0f}", "", "")
    table.add_row("scoring tokens/s", f"{t['scoring_tokens_per_second']:.0f}", "", "")
    table.add_row("scoring / training", f"{t['ratio']:.2f}", ">= 0.8", str(t["met"]))
    table.add_row("retraining s", f"{c['retraining_seconds']:.0f}", "", "")
    table.add_row("index s (once per version)", f"{c['index_seconds']:.0f}", "", "")
    table.add_row("debias job s", f"{c['job_seconds']:.0f}", "", "")
    table.add_row("job / retraining", f"{c['ratio']:.2f}", "<= 0.10", str(c["met"]))
    console.print(table)
    console.print(f"job: {outcome}\nstages: {json.dumps(stages)}\nwrote {path}")


if __name__ == "__main__":
    main()
