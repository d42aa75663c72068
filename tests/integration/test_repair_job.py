"""The repair on the tiny model: fidelity against retraining, a planted bias, jobs that drop
biases the guard users cannot measure."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fudlr.data.bundle import Bundle
from fudlr.errors import InputError
from fudlr.fairness.groups import item_groups, user_groups
from fudlr.fairness.surrogates import item_share_quantities, loss_quantities, sample_pools
from fudlr.influence.index import IndexConfig, build_index
from fudlr.influence.layout import ParameterLayout
from fudlr.influence.scores import influence_scores
from fudlr.influence.tracker import lora_linears
from fudlr.models.lora import load_adapter
from fudlr.models.store import load_base_model
from fudlr.recommender.recommend import Decoding, RecommendConfig
from fudlr.recommender.train import train_adapter
from fudlr.repair.acceptance import random_step
from fudlr.repair.cli import guard_notes, result_table
from fudlr.repair.config import DebiasConfig, MaskConfig, UnmeasurableBias
from fudlr.repair.guard import measurement_of
from fudlr.repair.pipeline import DebiasJob, RepairRejected
from fudlr.repair.queries import compute_queries
from fudlr.repair.selection import sample_gradients, score_samples
from fudlr.repair.spec import BiasSpec
from tests.conftest import PLANTED_COPIES, TINY_RECIPE, planted_bundle

K = 10  # the K of the guard's accuracy check (DebiasConfig.accuracy_k)


def test_index_of_an_adapter_for_another_base_model_is_refused(
    tmp_path: Path, tiny_bundle: Path, tiny_adapter
) -> None:
    from fudlr.models.tiny import TinyModelConfig, build_tiny_model

    other = tmp_path / "other"
    build_tiny_model(other, TinyModelConfig(hidden_size=96, intermediate_size=192))
    with pytest.raises(InputError, match="does not fit the base model"):
        build_index(other, tiny_adapter[0], Bundle.load(tiny_bundle), tmp_path / "i", device="cpu")
    assert not (tmp_path / "i").exists()


def _share_values(model_dir: Path, adapter: Path, bundle: Bundle, rows, pools, groups):
    base, tokenizer = load_base_model(model_dir)
    model = load_adapter(base, adapter, trainable=True)
    linears = lora_linears(model)
    return item_share_quantities(
        model,
        tokenizer,
        linears,
        ParameterLayout.of(linears),
        rows,
        pools,
        groups,
        bundle.item_completions(),
    )


def test_each_query_is_the_mean_of_its_per_user_parts(
    tiny_model: Path, tiny_bundle: Path, tiny_adapter
) -> None:
    """The eligibility test's per-user parts: their mean is the query; a user group's
    log-likelihood part is -U/|group| times the user's loss gradient for members, 0 else."""
    bundle = Bundle.load(tiny_bundle)
    rows = bundle.split("valid")
    groups = item_groups(bundle.items, "popularity_group")
    pools = sample_pools(rows, groups, per_stratum=2, seed=0)
    shares = _share_values(tiny_model, tiny_adapter[0], bundle, rows, pools, groups)
    assert shares.per_user.shape == (len(rows), len(groups.names), shares.gradients.size(1))
    torch.testing.assert_close(shares.per_user.double().mean(0), shares.gradients)

    base, tokenizer = load_base_model(tiny_model)
    model = load_adapter(base, tiny_adapter[0], trainable=True)
    linears = lora_linears(model)
    genders = user_groups(bundle.users, "gender")
    losses = loss_quantities(
        model, tokenizer, linears, ParameterLayout.of(linears), rows, [genders]
    )
    torch.testing.assert_close(losses.per_user.double().mean(0), losses.gradients)
    own = losses.per_user[:, 0]  # the accuracy column: each user's own loss gradient
    for column, name in enumerate(losses.names[1:], start=1):
        members = [
            i for i, row in enumerate(rows) if name.rsplit(":", 1)[1] in genders.of(row.user_id)
        ]
        expected = torch.zeros_like(losses.per_user[:, column])
        expected[members] = -len(rows) / len(members) * own[members]
        torch.testing.assert_close(losses.per_user[:, column], expected)
        assert 0 < len(members) < len(rows)


def test_the_temperature_calibrated_in_bf16_matches_fp32(
    tiny_model: Path, tiny_bundle: Path, tiny_adapter
) -> None:
    """A job decoding in bf16 calibrates its surrogate's temperature in bf16: the L1
    distances at every temperature stay within bf16's rounding of the fp32 ones."""
    from fudlr.fairness.surrogates import calibrate_temperature

    bundle = Bundle.load(tiny_bundle)
    rows = bundle.split("valid")
    groups = item_groups(bundle.items, "popularity_group")
    pools = sample_pools(rows, groups, per_stratum=2, seed=0)
    model = load_adapter(load_base_model(tiny_model)[0], tiny_adapter[0])
    tokenizer = load_base_model(tiny_model)[1]
    measured = torch.tensor([0.1, 0.1, 0.2, 0.2, 0.4])
    at = {
        precision: calibrate_temperature(
            model, tokenizer, rows, pools, bundle.item_completions(), measured, precision=precision
        )[1]
        for precision in ("fp32", "bf16")
    }
    assert set(at["bf16"]) == set(at["fp32"])
    for temperature, distance in at["fp32"].items():
        assert abs(at["bf16"][temperature] - distance) < 0.05, (temperature, at)
    assert max(at["fp32"].values()) - min(at["fp32"].values()) > 0.05  # the grid matters


@pytest.mark.slow
def test_predicted_changes_track_retraining_without_the_removed_samples(
    tmp_path: Path, tiny_model: Path, tiny_bundle: Path
) -> None:
    """Removing random sets: the influence prediction of each group share's change against
    the change measured after retraining (same seed, same recipe, those samples at weight 0)."""
    bundle = Bundle.load(tiny_bundle)
    samples = bundle.split("train")
    full = tmp_path / "full"
    train_adapter(tiny_model, bundle, full, TINY_RECIPE, device="cpu")
    build_index(tiny_model, full, bundle, tmp_path / "index", IndexConfig(batch_size=16), "cpu")
    from fudlr.influence.index import TrainingIndex

    index = TrainingIndex.load(
        tmp_path / "index",
        base_model_digest=json.loads((tmp_path / "index/index.json").read_text())[
            "base_model_digest"
        ],
        adapter_digest=json.loads((tmp_path / "index/index.json").read_text())["adapter_digest"],
        train_digest=json.loads((tmp_path / "index/index.json").read_text())["train_digest"],
    )
    groups = item_groups(bundle.items, "popularity_group")
    rows = bundle.split("valid")
    pools = sample_pools(rows, groups, per_stratum=6, seed=0)  # every item of the tiny catalog
    at_full = _share_values(tiny_model, full, bundle, rows, pools, groups)
    preconditioned = index.precondition(at_full.gradients)
    scores = influence_scores(index.cache.read(), preconditioned, index.samples, index.samples)

    generator = torch.Generator().manual_seed(0)
    predicted, actual = [], []
    for set_number, fraction in enumerate((0.1, 0.2, 0.3, 0.1, 0.2, 0.3)):
        removed = torch.randperm(len(samples), generator=generator)[: int(fraction * len(samples))]
        weights = torch.zeros(len(samples), dtype=torch.float64)
        weights[removed] = 1.0
        predicted.append(weights @ scores)
        retrained = tmp_path / f"without-{set_number}"
        zero = {samples[i].sample_id: 0.0 for i in removed.tolist()}
        train_adapter(tiny_model, bundle, retrained, TINY_RECIPE, weights=zero, device="cpu")
        after = _share_values(tiny_model, retrained, bundle, rows, pools, groups)
        actual.append(after.values - at_full.values)
    predicted_changes = torch.stack(predicted).flatten()
    actual_changes = torch.stack(actual).flatten()
    correlation = torch.corrcoef(torch.stack([predicted_changes, actual_changes]))[0, 1].item()
    print(f"\nfidelity: Pearson r(predicted, retrained) of group-share changes = {correlation:.3f}")
    assert correlation > 0.3


def test_a_job_on_a_candidate_index_numbers_its_rows_by_the_candidates(
    tmp_path: Path, tiny_model: Path, tiny_bundle: Path, tiny_adapter
) -> None:
    """Row i of a candidate index is the i-th candidate's gradient: the job's recomputed
    gradients of its candidates (what the Newton step removes) project onto the cached
    rows, and scores, selections and the random control range over the candidates only."""
    from functools import partial

    bundle = Bundle.load(tiny_bundle)
    config = IndexConfig(curvature_samples=None, candidates=9, batch_size=16)
    build_index(tiny_model, tiny_adapter[0], bundle, tmp_path / "index", config, "cpu")
    job = DebiasJob(
        tiny_model,
        tiny_adapter[0],
        bundle,
        tmp_path / "index",
        DebiasConfig(biases=(BiasSpec.parse("item:popularity_group:MGU@1"),), pool_per_group=2),
        device="cpu",
    )
    positions = job.index.candidates
    assert [s.sample_id for s in job.candidates] == [job.samples[p].sample_id for p in positions]
    assert len(job.candidates) == 9 < job.index.samples == len(bundle.split("train"))
    project = partial(job.index.projection.project, job.index.curvature)
    recomputed = dict(
        (i, project(job.layout.unflatten(row[None]))[0])
        for indices, rows in sample_gradients(job, range(9))
        for i, row in zip(indices, rows, strict=True)
    )
    cached = torch.cat([rows for _, rows in job.index.cache.read()])
    for i in range(9):
        assert torch.allclose(
            recomputed[i], cached[i], rtol=2e-2, atol=2e-3 * cached[i].abs().max()
        )
    scores, _ = score_samples(job, compute_queries(job))
    assert scores.shape[0] == 9
    step = random_step(job, [1.0, 1.0])
    assert set(step) == set(job.layout.names)


def test_a_planted_bias_is_found_and_unlearned(tmp_path: Path, tiny_model: Path, tiny_bundle: Path):
    bundle_dir = planted_bundle(tiny_bundle, tmp_path / "bundle", copies=PLANTED_COPIES)
    bundle = Bundle.load(bundle_dir)
    adapter = tmp_path / "adapter"
    train_adapter(tiny_model, bundle, adapter, TINY_RECIPE, device="cpu")
    build_index(tiny_model, adapter, bundle, tmp_path / "index", IndexConfig(batch_size=16), "cpu")
    # the default test (the selection against random samples on held-out query users, 5%)
    config = DebiasConfig(
        biases=(BiasSpec.parse("item:popularity_group:MGU@1"),),
        mask=MaskConfig(max_fraction=0.3),
        pool_per_group=6,
        max_ndcg_drop=0.5,
        # the grounded protocol this test was calibrated on; under constrained decoding the
        # same selection is found but its step moves MGU@1 only -10% on the 12 tiny users
        recommend=RecommendConfig(Decoding.GROUNDED, num_beams=2, exclude_history=False),
    )
    job = DebiasJob(tiny_model, adapter, bundle, tmp_path / "index", config, device="cpu")
    report = job.run(tmp_path / "out")

    selected = {entry["sample_id"] for entry in report["selected"]}
    planted = {s.sample_id for s in bundle.split("train") if s.sample_id.startswith("planted-")}
    precision = len(selected & planted) / len(selected)
    recall = len(selected & planted) / len(planted)
    valid = report["metrics"]["valid"]
    label = "item:popularity_group:MGU@1"
    print(
        f"\nplanted: {report['eligible']} eligible ({report['eligibility_test']}), "
        f"{len(selected)} selected, precision {precision:.2f}, recall {recall:.2f}; "
        f"MGU@1 {valid['before']['biases'][label]:.3f} -> {valid['after']['biases'][label]:.3f}"
    )
    assert precision >= 0.6 and recall >= 0.3
    assert report["eligibility_test"] == "selection" and report["selection_test"]["p"] <= 0.05
    assert report["sample_tests"]["tests"] == len(bundle.split("train"))
    assert valid["after"]["biases"][label] < valid["before"]["biases"][label]
    accepted = next(trial for trial in report["step_search"] if trial["eta"] == report["eta"])
    shares = accepted["share_changes"][label]
    print(f"share changes on the query users at eta={report['eta']}: {shares}")
    # the planted block pushes group 0: unlearning it is predicted to lower that share (the
    # measured change is a handful of tiny query users' flips: no sign to assert)
    assert shares["0"]["predicted"] < 0
    for side in ("predicted", "measured"):  # shares sum to 1 before and after
        assert abs(sum(group[side] for group in shares.values())) < 1e-5  # GP: 6 decimals
    # the same step from as many random samples: the planted block's removal does better
    control = report["random_control"]
    before, after = valid["before"]["biases"][label], valid["after"]["biases"][label]
    print(f"selected: {after / before - 1:+.1%}; random control: {control['bias_change']:+.1%}")
    assert control["samples"] == len(selected) and control["eta"] == report["eta"]
    assert after / before - 1 < control["bias_change"]
    # the default "require": the accepted guard attempt judged the selection against it
    assert report["guard"][-1]["random_control"] == control
    assert control["p_selection_not_better"] <= 1 - config.guard_confidence
    # the same bias at the other K: measured, shown in the CLI's table, not judged
    at_k = valid["after"]["biases_at_k"][label]
    assert set(at_k) == {"1", "5", "10"} and at_k["1"] == valid["after"]["biases"][label]
    console = Console(record=True, width=160)
    console.print(result_table(report))
    table = console.export_text()
    for k in ("5", "10"):
        row = next(line for line in table.splitlines() if f"same at K={k} " in line)
        assert f"{valid['after']['biases_at_k'][label][k]:.4f}" in row, row
    # the published step's accuracy, judged in the bootstrap at NDCG@10 (not the bias's K)
    accuracy = report["accuracy"]
    assert accuracy == report["guard"][-1]["accuracy"] and accuracy["k"] == 10
    assert accuracy["low"] <= accuracy["drop"] <= accuracy["high"]
    assert accuracy["hits_before"] == round(valid["before"]["HR@10"] * valid["before"]["users"])
    assert guard_notes(report)[-1].startswith("accuracy on the guard users: NDCG@10 drop")
    assert report["dropped_biases"] == []
    tracking = report["surrogate_tracking"][label]
    print(f"surrogate tracking: {tracking}")
    assert set(tracking["surrogate_share_change"]) == {"0", "1", "2", "3", "4"}

    # the job's model is back at the original weights (anything using it next starts there)
    original = load_adapter(load_base_model(tiny_model)[0], adapter)
    now = dict(job.model.named_parameters())
    for name, parameter in original.named_parameters():
        if "lora_" in name:
            assert torch.equal(now[name], parameter), name
    assert set(report["seconds"]) >= {"guard", "random control"}
    assert report["seconds"]["guard"] > 0

    # the repaired adapter: original config byte for byte, loads with stock PEFT, new outputs
    from peft import PeftModel

    repaired = tmp_path / "out" / "adapter"
    assert (repaired / "adapter_config.json").read_bytes() == (
        adapter / "adapter_config.json"
    ).read_bytes()
    base, tokenizer = load_base_model(tiny_model)
    model = PeftModel.from_pretrained(base, str(repaired))
    ids = tokenizer(bundle.split("valid")[0].prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        repaired_logits = model(ids).logits
    base, _ = load_base_model(tiny_model)
    with torch.no_grad():
        original_logits = PeftModel.from_pretrained(base, str(adapter))(ids).logits
    assert not torch.allclose(repaired_logits, original_logits)


def test_drop_unmeasurable_runs_the_job_on_the_other_biases(
    tmp_path: Path, tiny_model: Path, tiny_bundle: Path, tiny_adapter
) -> None:
    bundle = Bundle.load(tiny_bundle)
    build_index(tiny_model, tiny_adapter[0], bundle, tmp_path / "index", IndexConfig(), "cpu")
    popularity, genres = (
        BiasSpec.parse("item:popularity_group:MGU@1"),
        BiasSpec.parse("item:genres:MGU@1"),
    )
    config = DebiasConfig(
        biases=(popularity, genres),
        drop_unmeasurable=True,
        step_sizes=(1.0,),
        random_control="off",
        test_users=0,
    )
    job = DebiasJob(tiny_model, tiny_adapter[0], bundle, tmp_path / "index", config, "cpu")
    assert job.config.biases == (popularity,)
    try:
        report = job.run(tmp_path / "out")
    except RepairRejected as rejected:  # a random tiny adapter need not be repairable
        report = rejected.report
    assert report["biases"] == [popularity.label]
    assert [entry["bias"] for entry in report["dropped_biases"]] == [genres.label]
    assert "Mystery" in report["dropped_biases"][0]["reason"]
    # it went on: the queries and the mask ran for the bias that remains, and only for it
    assert any(name.startswith(f"{popularity.label}:share:") for name in report["surrogates"])
    assert not any(name.startswith(genres.label) for name in report["surrogates"])
    assert report["seconds"]["scores"] > 0 and report["seconds"]["mask"] > 0

    # a user group with no hit among the guard users, found once they are measured
    gender = BiasSpec.parse("user:gender:NDCG@5")
    config = DebiasConfig(biases=(popularity, gender), drop_unmeasurable=True, test_users=0)
    job = DebiasJob(tiny_model, tiny_adapter[0], bundle, tmp_path / "index", config, "cpu")
    rows = job.guard_rows
    of = user_groups(bundle.users, "gender")
    lists = {
        row.user_id: ([row.target] if "M" in of.of(row.user_id) else [])
        + [i for i in bundle.items if i != row.target][:K]
        for row in rows
    }
    before = measurement_of(bundle, "valid", rows, lists, config.biases, K, 0)
    measured = job.measurable(before)
    assert job.config.biases == (popularity,) and list(measured.biases) == [popularity.label]
    assert [entry["bias"] for entry in job.dropped] == [gender.label]
    strict = DebiasJob(
        tiny_model,
        tiny_adapter[0],
        bundle,
        tmp_path / "index",
        replace(config, drop_unmeasurable=False),
        "cpu",
    )
    with pytest.raises(UnmeasurableBias, match="user group\\(s\\) F have NDCG@5 = 0"):
        strict.measurable(before)
