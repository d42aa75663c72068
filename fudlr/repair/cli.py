"""`fudlr debias`: repair an adapter's bias and print before / predicted / after."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from fudlr.console import console, progress_bar
from fudlr.influence.projection import Projection
from fudlr.recommender.recommend import Decoding
from fudlr.repair.config import default


def debias(
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
    max_fraction: float = typer.Option(0.2, help="Most training samples removed (fraction)."),
    max_loss_increase: float = typer.Option(
        0.02, help="Largest predicted relative increase of the validation loss."
    ),
    max_ndcg_drop: float = typer.Option(
        0.05,
        help="Accuracy budget: the largest relative drop of NDCG@accuracy-k the guard accepts "
        "(refused when exceeded in --guard-confidence of the bootstrap resamples).",
    ),
    accuracy_k: int = typer.Option(
        default("accuracy_k"), min=1, help="K of the NDCG the guard checks, whatever the biases' K."
    ),
    guard_confidence: float = typer.Option(
        0.8, help="Bootstrap probability over guard users that the bias went down (0 = any drop)."
    ),
    eligibility: str = typer.Option(
        "selection",
        help="How a bias is told from noise: selection (the selection must beat random "
        "samples on held-out query users) or samples (each sample must stand out alone).",
    ),
    fdr: float = typer.Option(0.05, help="Level of the eligibility test."),
    max_other_k_increase: float = typer.Option(
        None,
        min=0,
        help="Largest relative increase of the bias at the other K (1, 5, 10) the guard "
        "accepts (default: reported, not judged).",
    ),
    max_upweight: float = typer.Option(
        0.0, min=0, help="Also reinforce samples, counted up to this many more times (0: off)."
    ),
    query_users: int = typer.Option(128, min=1, help="Validation users behind the queries."),
    guard_users: int = typer.Option(256, min=1, help="Validation users the guard measures."),
    test_users: int = typer.Option(
        None, min=0, help="Test users measured before/after (default all; 0 skips)."
    ),
    pool_per_group: int = typer.Option(4, min=1, help="Items scored per user and group."),
    anchored_pools: bool = typer.Option(
        True, help="Put the items each query user's beams ground to in its pool."
    ),
    random_control: str = typer.Option(
        "require",
        help="The same step from as many random samples: require (the selection must beat "
        "it), report (measured, not judged) or off.",
    ),
    temperature: float = typer.Option(
        None, min=1e-3, help="Of the surrogate's distribution (default: calibrated per job)."
    ),
    decoding: Decoding = typer.Option(
        Decoding.CONSTRAINED,
        help="How the hard recommendations are decoded (constrained, grounded).",
    ),
    num_beams: int = typer.Option(5, min=1, help="Beam width of the hard recommendations."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 autocast for generation."),
    projection: Projection = typer.Option(
        None,
        help="The gradient projection the index must store (eigenbasis, dense); "
        "default: whatever it stores.",
    ),
    drop_unmeasurable: bool = typer.Option(
        default("drop_unmeasurable"),
        "--drop-unmeasurable",
        help="Run on the biases the guard users can measure and report the others, instead "
        "of failing.",
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Find the training samples behind a bias and unlearn them from the LoRA weights."""
    from fudlr.control import Control
    from fudlr.data.bundle import Bundle
    from fudlr.influence.index import build_index
    from fudlr.recommender.recommend import RecommendConfig
    from fudlr.repair.config import DebiasConfig, MaskConfig, check_job
    from fudlr.repair.pipeline import DebiasJob
    from fudlr.repair.spec import BiasSpec

    config = DebiasConfig(
        biases=tuple(BiasSpec.parse(text) for text in bias),
        mask=MaskConfig(
            max_fraction=max_fraction,
            max_loss_increase=max_loss_increase,
            eligibility=eligibility,
            fdr=fdr,
            max_upweight=max_upweight,
        ),
        query_users=query_users,
        guard_users=guard_users,
        test_users=test_users,
        max_ndcg_drop=max_ndcg_drop,
        accuracy_k=accuracy_k,
        drop_unmeasurable=drop_unmeasurable,
        guard_confidence=guard_confidence,
        pool_per_group=pool_per_group,
        anchored_pools=anchored_pools,
        random_control=random_control,
        max_other_k_increase=max_other_k_increase,
        temperature=temperature,
        projection=projection,
        recommend=RecommendConfig(decoding=decoding, num_beams=num_beams, precision=precision),
    )
    data = Bundle.load(bundle)
    check_job(data, config)
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
