"""`make bench`: FUDLR against the retraining and reranking baselines, in one run.

Systems (all SmolLM2-135M-Instruct + LoRA on the same MovieLens-100K bundle and recipe):
original, IFairLRS reweighting (RW) and reranking (RR), GDRT, retraining without FUDLR's
selection, random removal with FUDLR's Newton step, FUDLR, FUDLR on two biases. Writes
bench/results/<date>-<profile>-<commit>.json, latest.json, latest.md and PNG plots in
bench/results/plots/.
`--quick` is a smoke profile; the full one takes hours on a small CPU and says so first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.common import (
    RESULTS,
    ROOT,
    commit,
    machine,
    prepare_movielens,
    prepare_smollm2,
    run_of,
)
from bench.report import fidelity, markdown, plot_all, targets
from bench.systems import PROFILES, RERUNNABLE, BenchProfile, SystemsBench, item_bias_label
from fudlr.baselines.gdrt import GRID, GdrtSettings
from fudlr.models.device import PRECISIONS, fast_precision

console = Console()


def run_and_write(
    profile: BenchProfile,
    model_dir: Path,
    bundle_dir: Path,
    work: Path,
    results_dir: Path,
    port: int = 8799,
    systems_from: Path | None = None,
    rerun: Sequence[str] = (),
) -> dict[str, Any]:
    """Run every system, the scaling sweep and the service (as the profile asks), and write
    the results; `systems_from`: take the systems another run recorded there (see
    `SystemsBench.recorded`, which runs those in `rerun` again) instead of running them,
    and its sweep and service run where this run skips them."""
    bench = SystemsBench(profile, model_dir, bundle_dir, work, console.log)
    results: dict[str, Any] = {
        "benchmark": "systems",
        "profile": profile.name,
        "date": date.today().isoformat(),
        "commit": commit(),
        "machine": machine(),
        "model": model_dir.name,
        "k": profile.k,
        "precision": profile.precision,
        "num_beams": profile.num_beams,
        **(bench.recorded(systems_from, rerun) if systems_from else bench.run()),
    }
    label = item_bias_label(profile.k)
    if profile.service:
        results["service"] = service(profile, model_dir, bundle_dir, work, label, port)
    if systems_from:
        results.update(carried(json.loads(systems_from.read_text()), results))
    results["targets"] = targets(results["systems"], profile.k)
    results["fidelity"] = fidelity(results["systems"], profile.k, label)
    write(results, results_dir)
    return results


def carried(source: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    """The sweep and the service run of the recorded run where this one skipped them, each
    with the run that measured it under `carried` (kept through later carries)."""
    parts = {
        part: source[part]
        for part in ("scaling", "service")
        if source.get(part) and not results.get(part)
    }
    if not parts:
        return {}
    origin = run_of(source)
    earlier = source.get("carried", {})
    return {**parts, "carried": {part: earlier.get(part, origin) for part in parts}}


def service(
    profile: BenchProfile, model_dir: Path, bundle_dir: Path, work: Path, bias: str, port: int
) -> dict[str, Any]:
    """The FUDLR job through `fudlr serve`; a failure is recorded, not fatal (the systems'
    results took far longer to get)."""
    from bench.service_run import through_the_service

    console.log("service: register, index, submit the same job over HTTP")
    try:
        return through_the_service(
            model_dir,
            work / "original",
            bundle_dir,
            work,
            {"curvature_samples": profile.curvature_samples, "precision": profile.precision},
            [bias],
            {
                "query_users": profile.query_users,
                "guard_users": profile.guard_users,
                "test_users": 0,
                "num_beams": profile.num_beams,
                "precision": profile.precision,
            },
            port,
        )
    except Exception as error:
        console.log(f"service run failed: {type(error).__name__}: {error}")
        return {"failure": f"{type(error).__name__}: {error}"}


def write(results: dict[str, Any], results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    # the commit in the name: two runs on one day at different commits keep both files
    dated = f"{results['date']}-{results['profile']}-{results['commit']}.json"
    (results_dir / dated).write_text(text)
    (results_dir / "latest.json").write_text(text)
    (results_dir / "latest.md").write_text(markdown(results))
    for path in plot_all(results, results_dir / "plots", "latest"):
        console.log(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke profile")
    parser.add_argument("--work", type=Path, default=ROOT / ".fudlr-bench" / "systems")
    parser.add_argument("--results", type=Path, default=RESULTS)
    precision = fast_precision()
    parser.add_argument(
        "--precision",
        default=precision,
        choices=PRECISIONS,
        help="default: bf16 where the hardware has native bf16 matmuls, else fp32",
    )
    parser.add_argument(
        "--num-beams",
        type=int,
        default=5 if precision == "bf16" else 1,
        help="beam width for every system (default: 5 where bf16 is native, else greedy)",
    )
    parser.add_argument("--no-service", action="store_true", help="skip the HTTP service run")
    parser.add_argument(
        "--no-scaling", action="store_true", help="skip the sweep over training-set sizes"
    )
    parser.add_argument(
        "--systems-from",
        type=Path,
        metavar="FILE",
        help="take the systems another run recorded instead of running them: the work "
        "folder's systems.partial.json (a run stopped after them) or a results JSON (a run "
        "with --no-scaling --no-service); the sweep and the service still run unless "
        "skipped; use the same commit",
    )
    parser.add_argument(
        "--rerun",
        action="append",
        default=[],
        choices=RERUNNABLE,
        help="with --systems-from: run this system again (the file may lack it); repeatable",
    )
    parser.add_argument(
        "--tune-gdrt",
        action="store_true",
        help=f"choose GDRT's groups and tau on the validation users from a grid of {len(GRID)} "
        f"(a fine-tuning run each); default: {GdrtSettings()}, not tuned",
    )
    parser.add_argument("--port", type=int, default=8799, help="port of the service run")
    args = parser.parse_args()
    if args.rerun and not args.systems_from:
        parser.error("--rerun runs a system again from recorded ones: give --systems-from")
    name = "quick" if args.quick else "full"
    profile = replace(
        PROFILES[name],
        precision=args.precision,
        num_beams=args.num_beams,
        service=not args.no_service,
        scaling_sizes=() if args.no_scaling else PROFILES[name].scaling_sizes,
        gdrt_grid=GRID if args.tune_gdrt else (),
    )
    console.rule(f"systems benchmark, {profile.name} profile: {profile.estimate}")
    work: Path = args.work / profile.name
    bundle_dir = prepare_movielens(work / "bundle", profile.train_size, profile.history_len)
    model_dir = prepare_smollm2(args.work.parent / "models", console.log)
    # a cache of its own, emptied: no job may reuse a measurement from an earlier run
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["FUDLR_CACHE_DIR"] = str(cache)
    results = run_and_write(
        profile, model_dir, bundle_dir, work, args.results, args.port, args.systems_from, args.rerun
    )
    console.print(markdown(results))


if __name__ == "__main__":
    main()
