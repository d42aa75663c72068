"""`fudlr index`: build the training-set index of one adapter version."""

from __future__ import annotations

from pathlib import Path

import typer

from fudlr.console import console, progress_bar
from fudlr.influence.projection import DEFAULT_PROJECTION, DEFAULT_PROJECTION_DIM, Projection


def index(
    base_model: Path = typer.Option(..., help="Base model directory (safetensors + tokenizer)."),
    adapter: Path = typer.Option(..., help="PEFT LoRA adapter directory."),
    bundle: Path = typer.Option(..., help="The bundle the adapter was trained on."),
    out: Path = typer.Option(..., help="Folder to write the index to."),
    kind: str = typer.Option("ekfac", help="Curvature: ekfac or kfac."),
    fisher: str = typer.Option("true", help="true (sampled labels: Gauss-Newton) or empirical."),
    damping: float = typer.Option(10.0, help="Damping as a fraction of the mean eigenvalue."),
    curvature_samples: int = typer.Option(
        1000, min=1, help="Fit the curvature on a fixed-seed subset of this many samples."
    ),
    candidates: int | None = typer.Option(
        None,
        min=1,
        help="Index a fixed-seed subset of this many training samples as the only removal "
        "candidates (default: all).",
    ),
    gradient_cache: bool = typer.Option(
        True, help="Cache every sample's gradient (jobs then need no training-set pass)."
    ),
    projection: Projection = typer.Option(
        DEFAULT_PROJECTION,
        help="What the cache keeps of each gradient: eigenbasis (PROJECTION_DIM coordinates "
        "of the curvature's eigenbasis) or dense (every LoRA weight).",
    ),
    projection_dim: int = typer.Option(
        DEFAULT_PROJECTION_DIM,
        min=1,
        help="Coordinates kept per sample by the eigenbasis projection.",
    ),
    batch_size: int = typer.Option(8, min=1, help="Samples per forward/backward."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 autocast for the passes."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Fit EK-FAC curvature and cache per-sample gradients, once per adapter version."""
    from fudlr.control import Control
    from fudlr.data.bundle import Bundle
    from fudlr.influence.index import IndexConfig, build_index
    from fudlr.influence.manifest import candidate_positions

    config = IndexConfig(
        kind=kind,
        fisher=fisher,
        damping_factor=damping,
        curvature_samples=curvature_samples,
        candidates=candidates,
        gradient_cache=gradient_cache,
        projection=projection,
        projection_dim=projection_dim,
        batch_size=batch_size,
        precision=precision,
    )
    data = Bundle.load(bundle, splits=("train",))
    with progress_bar("index") as bar:

        def show(stage: str, done: int, total: int) -> None:
            bar.update(0, description=stage, completed=done, total=total)

        control = Control(progress=show, event=bar.console.print)
        manifest = build_index(base_model, adapter, data, out, config, device, control)
    seconds = ", ".join(f"{stage} {value:.1f}s" for stage, value in manifest["seconds"].items())
    stored = manifest["projection"]
    console.print(
        f"index: {out}\nsamples: {manifest['samples']} "
        f"(indexed: {len(candidate_positions(manifest))})  "
        f"LoRA weights: {manifest['dim']:,}  "
        f"cached: {stored['kind']}, {stored['dim']:,} numbers "
        f"({manifest['bytes_per_sample']:,} bytes) per sample  time: {seconds}"
    )
