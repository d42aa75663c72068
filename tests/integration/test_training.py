"""Training a LoRA adapter on the tiny model: the loss falls, stock PEFT reloads it, a seeded
run repeats itself, and samples at weight 0 teach nothing."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

from fudlr.data.bundle import Bundle
from fudlr.models.lora import base_model_only
from fudlr.models.store import load_base_model, model_digest
from fudlr.recommender.train import TrainConfig, train_adapter
from tests.conftest import sample_losses


def test_training_lowers_the_loss_and_round_trips_through_stock_peft(
    tiny_model: Path, tiny_bundle: Path, tiny_adapter
) -> None:
    adapter_dir, report = tiny_adapter
    assert report.epoch_losses[-1] < report.epoch_losses[0] * 0.8
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    manifest = json.loads((adapter_dir / "fudlr-train.json").read_text())
    assert manifest["base_model"]["digest"] == model_digest(tiny_model)
    assert len(manifest["sample_ids"]) == report.samples

    samples = Bundle.load(tiny_bundle).split("train")
    base, tokenizer = load_base_model(tiny_model)
    before = sample_losses(base, tokenizer, samples)
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir))  # stock PEFT, no helper
    after = sample_losses(reloaded, tokenizer, samples)
    assert after.mean() < before.mean() * 0.8
    with base_model_only(reloaded):
        torch.testing.assert_close(sample_losses(reloaded, tokenizer, samples), before)


def test_training_is_reproducible(tmp_path: Path, tiny_model: Path, tiny_bundle: Path) -> None:
    config = TrainConfig(epochs=1, learning_rate=1e-2, max_samples=32)
    bundle = Bundle.load(tiny_bundle)
    first = train_adapter(tiny_model, bundle, tmp_path / "a", config, device="cpu")
    second = train_adapter(tiny_model, bundle, tmp_path / "b", config, device="cpu")
    assert first.epoch_losses == second.epoch_losses
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()


def test_zero_weights_leave_the_adapter_at_its_initialisation(
    tmp_path: Path, tiny_model: Path, tiny_bundle: Path
) -> None:
    from safetensors.torch import load_file

    bundle = Bundle.load(tiny_bundle)
    zero = {sample.sample_id: 0.0 for sample in bundle.split("train")}
    config = TrainConfig(epochs=1, learning_rate=1e-2, max_samples=16)
    train_adapter(tiny_model, bundle, tmp_path / "zero", config, weights=zero, device="cpu")
    train_adapter(tiny_model, bundle, tmp_path / "one", config, device="cpu")
    zero_b, one_b = (
        [
            t
            for k, t in load_file(tmp_path / run / "adapter_model.safetensors").items()
            if "lora_B" in k
        ]
        for run in ("zero", "one")
    )
    assert all(torch.count_nonzero(t) == 0 for t in zero_b)  # B starts at zero; no gradient
    assert any(torch.count_nonzero(t) > 0 for t in one_b)
