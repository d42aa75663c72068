"""The recommender on the untrained tiny model: the model's build, encoding, padded losses,
weights files, grounding, adapter targets and refusals (training and a trained adapter's
decoding: tests/integration/test_training.py and test_recommend.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft.tuners.tuners_utils import check_target_module_exists

from fudlr.data.bundle import Bundle
from fudlr.errors import InputError
from fudlr.models.lora import check_targets, target_matches
from fudlr.models.store import load_base_model, model_digest
from fudlr.models.tiny import build_tiny_model
from fudlr.recommender.encoding import encode_sample
from fudlr.recommender.grounding import embed_texts, rank_by_distance
from fudlr.recommender.recommend import recommend
from fudlr.recommender.train import read_weights
from tests.conftest import sample_losses


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
    batched = sample_losses(model, tokenizer, samples)
    alone = torch.cat([sample_losses(model, tokenizer, [sample]) for sample in samples])
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


def test_weights_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "weights.jsonl"
    path.write_text('{"sample_id": "a", "weight": 0.5}\n{"sample_id": "zzz", "weight": 1}\n')
    with pytest.raises(InputError, match=r"weights.jsonl:2: field 'sample_id': unknown sample"):
        read_weights(path, {"a"})
    path.write_text('{"sample_id": "a", "weight": -1}\n')
    with pytest.raises(InputError, match=r"weights.jsonl:1: field 'weight'"):
        read_weights(path, {"a"})


def test_an_exact_title_generation_grounds_to_that_item(
    tiny_model: Path, tiny_bundle: Path
) -> None:
    model, tokenizer = load_base_model(tiny_model)
    texts = list(Bundle.load(tiny_bundle).item_completions().values())
    catalog = embed_texts(model, tokenizer, texts)
    ranking = rank_by_distance(embed_texts(model, tokenizer, texts[::-1]), catalog)
    assert ranking[:, 0].tolist() == list(range(len(texts)))[::-1]


def test_recommend_refuses_a_split_with_repeated_users(
    tmp_path: Path, tiny_model: Path, tiny_bundle: Path
) -> None:
    with pytest.raises(InputError, match="several rows for user"):
        recommend(tiny_model, None, Bundle.load(tiny_bundle), "train", tmp_path / "r.jsonl")


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
