"""The recommender with a trained tiny adapter: title scores, rankings written per user,
adapters that do not fit the base model, and beam search against transformers' generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fudlr.data.bundle import Bundle
from fudlr.errors import InputError
from fudlr.models.lora import load_adapter
from fudlr.models.store import load_base_model, model_digest
from fudlr.models.tiny import build_tiny_model
from fudlr.recommender.encoding import collate, encode_sample, per_sample_loss
from fudlr.recommender.recommend import Decoding, RecommendConfig, recommend
from fudlr.recommender.scoring import score_completions


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
