"""`fudlr train` and `fudlr recommend`: fine-tune the LLM recommender and run it on a split."""

from __future__ import annotations

from pathlib import Path

import typer

from fudlr.console import console, progress_bar
from fudlr.recommender.recommend import CONSTRAINED_TOP, Decoding, RecommendConfig
from fudlr.setting import declared, option

RECOMMEND = declared(RecommendConfig)  # its options that a debias job takes too


def train(
    base_model: Path = typer.Option(..., help="Base model directory (safetensors + tokenizer)."),
    bundle: Path = typer.Option(..., help="Data bundle directory (see `fudlr data`)."),
    out: Path = typer.Option(..., help="Folder to write the PEFT adapter to."),
    epochs: int = typer.Option(1, min=1, help="Passes over the training samples."),
    max_samples: int = typer.Option(
        None, min=1, help="Train on a fixed-seed subset of this many samples."
    ),
    weights: Path = typer.Option(
        None, help='Per-sample weights, JSON Lines {"sample_id": ..., "weight": w}; default 1.'
    ),
    learning_rate: float = typer.Option(3e-3, min=0.0, help="Peak AdamW learning rate."),
    batch_size: int = typer.Option(8, min=1, help="Samples per optimisation step."),
    max_length: int = typer.Option(256, min=8, help="Longest sequence in tokens."),
    rank: int = typer.Option(8, min=1, help="LoRA rank r."),
    alpha: int = typer.Option(16, min=1, help="LoRA alpha (update scaled by alpha/r)."),
    target_modules: str = typer.Option("q_proj,v_proj", help="Comma-separated modules to adapt."),
    top_layers: int = typer.Option(
        None, min=1, help="Adapt only the last N layers (backpropagation stops below them)."
    ),
    seed: int = typer.Option(0, help="Seed of LoRA init, sample order, dropout and subsetting."),
    precision: str = typer.Option(
        "fp32", help="fp32, or bf16 autocast (faster on bf16 CPUs/GPUs)."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Fine-tune a LoRA adapter on the bundle's train split (loss on completion tokens only)."""
    from fudlr.data.bundle import Bundle
    from fudlr.models.lora import LoraSettings
    from fudlr.recommender.train import TrainConfig, read_weights, train_adapter

    data = Bundle.load(bundle, splits=("train",))
    sample_weights = None
    if weights is not None:
        sample_weights = read_weights(weights, {s.sample_id for s in data.split("train")})
    config = TrainConfig(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        max_samples=max_samples,
        seed=seed,
        precision=precision,
        lora=LoraSettings(
            rank=rank,
            alpha=alpha,
            target_modules=tuple(name.strip() for name in target_modules.split(",") if name),
            top_layers=top_layers,
        ),
    )
    with progress_bar("training") as bar:

        def show(step: int, total: int, loss: float) -> None:
            bar.update(0, completed=step, total=total, status=f"loss {loss:.3f}")

        report = train_adapter(
            base_model, data, out, config, sample_weights, device=device, progress=show
        )
    losses = ", ".join(f"{loss:.3f}" for loss in report.epoch_losses)
    console.print(
        f"adapter: {out}\nsamples: {report.samples}  epochs: {epochs}  loss per epoch: {losses}\n"
        f"time: {report.seconds:.1f}s ({report.samples_per_second:.2f} samples/s)"
    )


def recommend(
    base_model: Path = typer.Option(..., help="Base model directory (safetensors + tokenizer)."),
    adapter: Path = typer.Option(None, help="PEFT adapter directory (omit: the base model)."),
    bundle: Path = typer.Option(..., help="Data bundle directory."),
    split: str = typer.Option("test", help="Split to recommend for (one row per user)."),
    out: Path = typer.Option(..., help="recommendations.jsonl to write."),
    decoding: Decoding = option(RECOMMEND["decoding"]),
    num_beams: int = option(RECOMMEND["num_beams"]),
    batch_size: int = typer.Option(16, min=1, help="Prompts generated at once."),
    top: int = typer.Option(
        None,
        min=1,
        help=f"Items per user (default: {CONSTRAINED_TOP} constrained, the catalog grounded).",
    ),
    exclude_history: bool = typer.Option(
        None,
        help="Never recommend an item already in the user's history (its prompt's); "
        "default: yes when constrained, no when grounded.",
    ),
    length_normalization: bool = typer.Option(
        False, help="Constrained: rank titles by mean, not summed, token log-probability."
    ),
    precision: str = option(RECOMMEND["precision"]),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    users: int = typer.Option(
        None, min=1, help="Only a fixed-seed subset of this many users (default: all)."
    ),
    seed: int = typer.Option(0, help="Seed of the --users subset (`fudlr metrics` takes it too)."),
) -> None:
    """Recommend K items per user of a split (constrained decoding) or rank the whole
    catalog by a generated title (grounded), and write the lists."""
    from fudlr.data.bundle import Bundle
    from fudlr.recommender.recommend import recommend as run_recommend

    data = Bundle.load(bundle, splits=(split,))
    config = RecommendConfig(
        decoding=decoding,
        num_beams=num_beams,
        batch_size=batch_size,
        top=top,
        exclude_history=exclude_history,
        length_normalization=length_normalization,
        precision=precision,
    )
    with progress_bar(f"recommending ({split})") as bar:

        def show(done: int, total: int) -> None:
            bar.update(0, completed=done, total=total)

        report = run_recommend(
            base_model, adapter, data, split, out, config, device, show, users, seed
        )
    console.print(
        f"recommendations: {out}\nusers: {report.users}  generations that are exact catalog "
        f"titles: {report.exact_matches} ({report.exact_matches / report.users:.0%})  "
        f"time: {report.seconds:.1f}s"
    )
