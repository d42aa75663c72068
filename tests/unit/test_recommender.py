"""The recommender on the tiny model: encoding, training, PEFT round trip, scoring, grounding."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import check_target_module_exists

from fudlr.data.bundle import Bundle
from fudlr.errors import InputError
from fudlr.models.lora import base_model_only, check_targets, load_adapter, target_matches
from fudlr.models.store import load_base_model, model_digest
from fudlr.models.tiny import build_tiny_model
from fudlr.recommender.encoding import collate, encode_sample, per_sample_loss
from fudlr.recommender.grounding import embed_texts, rank_by_distance
from fudlr.recommender.recommend import Decoding, RecommendConfig, recommend
from fudlr.recommender.scoring import score_completions
from fudlr.recommender.train import TrainConfig, read_weights, train_adapter


def _losses(model, tokenizer, samples) -> torch.Tensor:
    encoded = [encode_sample(tokenizer, s.prompt, s.completion, 256) for s in samples]
    with torch.no_grad():
        return per_sample_loss(model, collate(encoded, tokenizer.pad_token_id))


def test_tiny_model_is_deterministic(tmp_path: Path, tiny_model: Path) -> None:
    first = build_tiny_model(tmp_path / "a", corpus=["Movie 1 (1971)"])
    second = build_tiny_model(tmp_path / "b", corpus=["Movie 1 (1971)"])
    assert first.digest == second.digest
    assert model_digest(tmp_path / "a") == first.digest


def test_encoding_keeps_completion_and_truncates_the_oldest_prompt_tokens(tiny_model: Path) -> None:
    _, tokenizer = load_base_model(tiny_model)
    full = encode_sample(tokenizer, "a long prompt " * 20, '"Movie 1 (1971)"', 512)
    short = encode_sample(tokenizer, "a long prompt " * 20, '"Movie 1 (1971)"', 24)
    assert not full.truncated and short.truncated and len(short.input_ids) == 24
    assert full.input_ids[full.completion_start :] == short.input_ids[short.completion_start :]
    assert full.input_ids[-1] == tokenizer.eos_token_id
    prompt_end = full.input_ids[full.completion_start - 5 : full.completion_start]
    assert prompt_end == short.input_ids[short.completion_start - 5 : short.completion_start]


def test_padded_batch_loss_equals_each_sample_alone(tiny_model: Path, tiny_bundle: Path) -> None:
    model, tokenizer = load_base_model(tiny_model)
    samples = Bundle.load(tiny_bundle).split("train")[:5]
    batched = _losses(model, tokenizer, samples)
    alone = torch.cat([_losses(model, tokenizer, [sample]) for sample in samples])
    # reference: full logits over the unpadded sequence
    reference = []
    for sample in samples:
        encoded = encode_sample(tokenizer, sample.prompt, sample.completion, 256)
        ids = torch.tensor([encoded.input_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        reference.append(nll[encoded.completion_start - 1 :].mean())
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, torch.stack(reference), rtol=1e-5, atol=1e-5)


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
    before = _losses(base, tokenizer, samples)
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir))  # stock PEFT, no helper
    after = _losses(reloaded, tokenizer, samples)
    assert after.mean() < before.mean() * 0.8
    with base_model_only(reloaded):
        torch.testing.assert_close(_losses(reloaded, tokenizer, samples), before)


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


def test_weights_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "weights.jsonl"
    path.write_text('{"sample_id": "a", "weight": 0.5}\n{"sample_id": "zzz", "weight": 1}\n')
    with pytest.raises(InputError, match=r"weights.jsonl:2: field 'sample_id': unknown sample"):
        read_weights(path, {"a"})
    path.write_text('{"sample_id": "a", "weight": -1}\n')
    with pytest.raises(InputError, match=r"weights.jsonl:1: field 'weight'"):
        read_weights(path, {"a"})


def test_title_scores_with_a_shared_prompt_cache_match_full_sequences(
    tiny_model: Path, tiny_bundle: Path, tiny_adapter
) -> None:
    base, tokenizer = load_base_model(tiny_model)
    model = load_adapter(base, tiny_adapter[0], trainable=True)
    bundle = Bundle.load(tiny_bundle)
    sample = bundle.split("valid")[0]
    texts = list(bundle.item_completions().values())[:7]
    scores = score_completions(model, tokenizer, sample.prompt, texts, chunk_size=3)
    for text, score in zip(texts, scores, strict=True):
        encoded = encode_sample(tokenizer, sample.prompt, text, 512)
        tokens = len(encoded.input_ids) - encoded.completion_start
        with torch.no_grad():
            loss = per_sample_loss(model, collate([encoded], tokenizer.pad_token_id))
        assert score.item() == pytest.approx(-loss.item() * tokens, rel=1e-4, abs=1e-4)
    # differentiable with respect to the LoRA weights
    scores.logsumexp(0).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and any(torch.count_nonzero(g) > 0 for g in grads)


def test_an_exact_title_generation_grounds_to_that_item(
    tiny_model: Path, tiny_bundle: Path
) -> None:
    model, tokenizer = load_base_model(tiny_model)
    texts = list(Bundle.load(tiny_bundle).item_completions().values())
    catalog = embed_texts(model, tokenizer, texts)
    ranking = rank_by_distance(embed_texts(model, tokenizer, texts[::-1]), catalog)
    assert ranking[:, 0].tolist() == list(range(len(texts)))[::-1]


def test_recommend_writes_a_full_ranking_per_test_user(
    tmp_path: Path, tiny_model: Path, tiny_bundle: Path, tiny_adapter
) -> None:
    from fudlr.fairness.metrics import evaluate, load_recommendations

    bundle = Bundle.load(tiny_bundle)
    out = tmp_path / "recs.jsonl"
    config = RecommendConfig(Decoding.GROUNDED, num_beams=2, batch_size=4, exclude_history=False)
    report = recommend(tiny_model, tiny_adapter[0], bundle, "test", out, config, device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.users == len(rows) == len(bundle.split("test"))
    assert [row["user_id"] for row in rows] == [s.user_id for s in bundle.split("test")]
    assert all(sorted(row["items"]) == sorted(bundle.items) for row in rows)
    metrics = evaluate(bundle, "test", load_recommendations(out, bundle), ks=[1, 5])
    assert 0.0 <= metrics["k"]["5"]["NDCG"] <= 1.0

    trimmed = tmp_path / "top.jsonl"
    config = RecommendConfig(Decoding.GROUNDED, num_beams=1, top=5, exclude_history=True)
    recommend(tiny_model, tiny_adapter[0], bundle, "test", trimmed, config, device="cpu")
    for row, sample in zip(
        (json.loads(line) for line in trimmed.read_text().splitlines()),
        bundle.split("test"),
        strict=True,
    ):
        assert len(row["items"]) == 5 and not set(row["items"]) & set(sample.history)


def test_recommend_refuses_a_split_with_repeated_users(
    tmp_path: Path, tiny_model: Path, tiny_bundle: Path
) -> None:
    with pytest.raises(InputError, match="several rows for user"):
        recommend(tiny_model, None, Bundle.load(tiny_bundle), "train", tmp_path / "r.jsonl")


def test_adapter_that_does_not_fit_the_base_model_is_refused(
    tmp_path: Path, tiny_model: Path, tiny_adapter
) -> None:
    other = build_tiny_model(tmp_path / "wide", config=_wide())
    base, _ = load_base_model(tmp_path / "wide")
    with pytest.raises(InputError, match="does not fit the base model"):
        load_adapter(base, tiny_adapter[0])
    assert other.digest != model_digest(tiny_model)

    config = json.loads((tiny_adapter[0] / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "no_such_proj"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps(config))
    (broken / "adapter_model.safetensors").write_bytes(
        (tiny_adapter[0] / "adapter_model.safetensors").read_bytes()
    )
    base, _ = load_base_model(tiny_model)
    with pytest.raises(InputError, match="lacks: no_such_proj"):
        load_adapter(base, broken)


MODULES = [
    "model.embed_tokens",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.mlp.gate_proj",
    "lm_head",
]


@pytest.mark.parametrize(
    "targets",
    [
        "q_proj",  # a string is a regular expression over full names: this one matches none
        r".*\.(q|v)_proj",
        r"model\.layers\.1\..*",
        ["q_proj", "v_proj"],
        ["self_attn.q_proj"],
        ["layers.0.self_attn.q_proj", "lm_head"],
        ["proj"],  # a suffix after a '.', not any ending
    ],
)
def test_target_modules_match_module_names_as_peft_matches_them(targets: str | list[str]) -> None:
    """The service (from safetensors headers) and the method (from the loaded model) check
    an adapter's target_modules with PEFT's own rule."""
    config = SimpleNamespace(
        target_modules=targets,
        exclude_modules=None,
        modules_to_save=None,
        target_parameters=None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    for name in MODULES:
        assert target_matches(targets, name) == bool(check_target_module_exists(config, name))


def test_target_modules_the_base_model_lacks_are_refused() -> None:
    check_targets(r".*\.(q|v)_proj", MODULES, "adapter_config.json")
    check_targets(["q_proj", "self_attn.v_proj"], MODULES, "adapter_config.json")
    with pytest.raises(InputError, match="'q_proj' matches no module"):
        check_targets("q_proj", MODULES, "adapter_config.json")
    with pytest.raises(InputError, match=r"lacks: o_proj, proj$"):
        check_targets(["q_proj", "o_proj", "proj"], MODULES, "adapter_config.json")
    with pytest.raises(InputError, match="not a valid regular expression"):
        check_targets("(q_proj", MODULES, "adapter_config.json")


def test_pickled_weights_are_refused(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for path in tiny_model.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(InputError, match="pickled weights are refused"):
        load_base_model(folder)


def _wide():
    from fudlr.models.tiny import TinyModelConfig

    return TinyModelConfig(hidden_size=96, intermediate_size=192, heads=4, kv_heads=2)


@pytest.mark.parametrize("num_beams", [1, 3, 5])
def test_beam_search_matches_transformers_generate(
    tiny_model: Path, tiny_bundle: Path, tiny_adapter, num_beams: int
) -> None:
    """Our prompt-once beam search must pick what `generate` picks, at a fraction of the cost."""
    from fudlr.recommender.encoding import encode_prompt
    from fudlr.recommender.generate import beam_search, left_pad

    base, tokenizer = load_base_model(tiny_model)
    model = load_adapter(base, tiny_adapter[0])
    prompts = [sample.prompt for sample in Bundle.load(tiny_bundle).split("test")]
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    eos, limit = tokenizer.eos_token_id, 16
    lengths = []
    # raising the EOS logit makes some hypotheses end early while others hit the limit
    for eos_bias in (0.0, 3.0, 4.0, 5.0):
        bias = torch.zeros(len(tokenizer))
        bias[eos] = eos_bias
        hook = model.get_output_embeddings().register_forward_hook(
            lambda m, i, out, bias=bias: out + bias
        )
        with torch.no_grad():
            ours = beam_search(
                model,
                ids,
                mask,
                num_beams=num_beams,
                max_new_tokens=limit,
                eos_token_id=eos,
                returns=num_beams,
            )
            theirs = model.generate(
                input_ids=ids,
                attention_mask=mask,
                num_beams=num_beams,
                num_return_sequences=num_beams,
                do_sample=False,
                early_stopping=True,
                max_new_tokens=limit,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        hook.remove()
        expected = [[t for t in row[ids.size(1) :].tolist() if t != eos] for row in theirs]
        # every beam, best first, as transformers ranks them (num_return_sequences)
        flat = [tokens for row in ours for tokens in row]
        assert flat == expected, f"EOS bias {eos_bias}"
        lengths += [len(row[0]) for row in ours]
    assert min(lengths) < limit and max(lengths) == limit
