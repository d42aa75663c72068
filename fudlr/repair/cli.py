"""`fudlr debias`: repair an adapter's bias and print before / predicted / after."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from fudlr.console import console, progress_bar
from fudlr.data.bundle import Bundle
from fudlr.influence.projection import Projection
from fudlr.recommender.recommend import Decoding
from fudlr.repair.config import SETTINGS, check_job, job_config
from fudlr.repair.spec import BiasSpec
from fudlr.setting import option


def debias(
    ctx: typer.Context,
    base_model: Path = typer.Option(..., help="Base model directory (safetensors + tokenizer)."),
    adapter: Path = typer.Option(..., help="PEFT LoRA adapter directory to repair."),
    bundle: Path = typer.Option(..., help="The bundle the adapter was trained on."),
    bias: list[str] = typer.Option(
        ...,
        help="SIDE:ATTRIBUTE:METRIC@K[*WEIGHT], e.g. item:popularity_group:MGU@5 or "
        "user:gender:NDCG@5; repeat for several.",
    ),
    out: Path = typer.Option(..., help="Folder for the repaired adapter and report.json."),
    index: Path = typer.Option(
        None, help="Training-set index (`fudlr index`); built into OUT/index if omitted."
    ),
    max_fraction: float = option(SETTINGS["max_fraction"]),
    max_loss_increase: float = option(SETTINGS["max_loss_increase"]),
    max_ndcg_drop: float = option(SETTINGS["max_ndcg_drop"]),
    accuracy_k: int = option(SETTINGS["accuracy_k"]),
    guard_confidence: float = option(SETTINGS["guard_confidence"]),
    eligibility: str = option(SETTINGS["eligibility"]),
    fdr: float = option(SETTINGS["fdr"]),
    max_other_k_increase: float = option(SETTINGS["max_other_k_increase"]),
    max_upweight: float = option(SETTINGS["max_upweight"]),
    query_users: int = option(SETTINGS["query_users"]),
    guard_users: int = option(SETTINGS["guard_users"]),
    test_users: int = option(SETTINGS["test_users"]),
    pool_per_group: int = option(SETTINGS["pool_per_group"]),
    anchored_pools: bool = option(SETTINGS["anchored_pools"]),
    random_control: str = option(SETTINGS["random_control"]),
    temperature: float = option(SETTINGS["temperature"]),
    decoding: Decoding = option(SETTINGS["decoding"]),
    num_beams: int = option(SETTINGS["num_beams"]),
    precision: str = option(SETTINGS["precision"]),
    projection: Projection = option(SETTINGS["projection"]),
    drop_unmeasurable: bool = option(SETTINGS["drop_unmeasurable"], "--drop-unmeasurable"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Find the training samples behind a bias and unlearn them from the LoRA weights."""
    # the flags named after a setting are the job's, checked before torch is imported
    settings = {name: value for name, value in ctx.params.items() if name in SETTINGS}
    config = job_config([BiasSpec.parse(text) for text in bias], settings)
    data = Bundle.load(bundle)
    check_job(data, config)

    from fudlr.control import Control
    from fudlr.influence.index import build_index
    from fudlr.repair.pipeline import DebiasJob

    with progress_bar("debias") as bar:

        def show(stage: str, done: int, total: int) -> None:
            bar.update(0, description=stage, completed=done, total=total)

        control = Control(progress=show, event=bar.console.print)
        if index is None:
            index = out / "index"
            control.event(f"no --index given: building it into {index}")
            build_index(base_model, adapter, data, index, device=device, control=control)
        report = DebiasJob(base_model, adapter, data, index, config, device, control).run(out)
    console.print(result_table(report))
    for line in guard_notes(report):
        console.print(line)
    random_control = report["random_control"]
    if random_control is not None:
        console.print(
            f"the same step from {random_control['samples']} random samples: bias change "
            f"{random_control['bias_change']:+.1%} on the validation users "
            f"(P(selection not better) {random_control['p_selection_not_better']:.2f})"
        )
    console.print(
        f"repaired adapter: {out / 'adapter'} (eta {report['eta']}, "
        f"{len(report['selected'])} of {report['training_samples']} samples changed)\n"
        f"report: {out / 'report.json'}"
    )


def result_table(report: dict) -> Table:
    """Each bias and accuracy: before, predicted by the influence model, measured after."""
    table = Table(title="debias: before / predicted / after")
    splits = [split for split in ("valid", "test") if split in report["metrics"]]
    table.add_column("metric")
    table.add_column("predicted (surrogate)", justify="right")
    for split in splits:
        table.add_column(f"{split} before", justify="right")
        table.add_column(f"{split} after", justify="right")
    predicted = report["predicted"]
    for label in report["biases"]:
        cells = [f"{predicted[f'{label}:before']:.4f} → {predicted[f'{label}:after']:.4f}"]
        for split in splits:
            metrics = report["metrics"][split]
            cells += [f"{metrics[w]['biases'][label]:.4f}" for w in ("before", "after")]
        table.add_row(label, *cells)
        # the same bias at the other K measured: not judged by the guard, so shown
        own_k = label.rsplit("@", 1)[1]
        for k in report["metrics"]["valid"]["before"]["biases_at_k"][label]:
            if k == own_k:
                continue
            cells = [""]
            for split in splits:
                metrics = report["metrics"][split]
                cells += [f"{metrics[w]['biases_at_k'][label][k]:.4f}" for w in ("before", "after")]
            table.add_row(f"  same at K={k}", *cells)
    accuracy = [
        key for key in report["metrics"]["valid"]["before"] if key.startswith(("NDCG", "HR"))
    ]
    loss = f"{predicted['valid_loss:before']:.4f} → {predicted['valid_loss:after']:.4f}"
    for index, key in enumerate(accuracy):
        cells = [f"valid loss {loss}" if index == 0 else ""]
        for split in splits:
            metrics = report["metrics"][split]
            cells += [f"{metrics[w][key]:.4f}" for w in ("before", "after")]
        table.add_row(key, *cells)
    return table


def guard_notes(report: dict) -> list[str]:
    """What the table leaves out: the accepted step's accuracy judgement, saying so when
    its budget was unresolved, and the biases dropped because they could not be measured."""
    from fudlr.repair.guard import AccuracyCheck

    notes = [
        f"dropped {entry['bias']}: {entry['reason']}" for entry in report.get("dropped_biases", [])
    ]
    if report.get("accuracy"):
        accuracy = AccuracyCheck(**report["accuracy"])
        notes.append(f"accuracy on the guard users: {accuracy.explain()}")
    return notes
