"""The repair on the tiny model: bad specifications, fidelity against retraining, a planted bias."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fudlr.data.bundle import Bundle
from fudlr.data.jsonl import write_rows
from fudlr.errors import InputError
from fudlr.fairness.groups import item_groups, user_groups
from fudlr.fairness.metrics import group_shares
from fudlr.fairness.surrogates import item_share_quantities, loss_quantities, sample_pools
from fudlr.influence.index import IndexConfig, build_index
from fudlr.influence.layout import ParameterLayout
from fudlr.influence.scores import influence_scores
from fudlr.influence.tracker import lora_linears
from fudlr.models.lora import load_adapter
from fudlr.models.store import load_base_model
from fudlr.recommender.recommend import Decoding, RecommendConfig
from fudlr.recommender.train import train_adapter
from fudlr.repair.acceptance import random_step, rank_step_sizes
from fudlr.repair.cli import guard_notes, result_table
from fudlr.repair.config import DebiasConfig, MaskConfig
from fudlr.repair.guard import (
    accuracy_check,
    beats_control,
    bootstrap_no_reduction,
    measurement_of,
    other_k_check,
    verdict,
)
from fudlr.repair.pipeline import DebiasJob
from fudlr.repair.queries import compute_queries
from fudlr.repair.selection import sample_gradients, score_samples
from fudlr.repair.spec import BiasSpec
from tests.conftest import TINY_RECIPE, planted_bundle, run_cli


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("popularity_group:MGU@5", "expected SIDE:ATTRIBUTE:METRIC@K"),
        ("item:popularity_group:NDCG@5", "metric must be one of MGU, DGU"),
        ("user:gender:MGU@5", "metric must be one of NDCG"),
        ("item:popularity_group:MGU@0", "K must be at least 1"),
    ],
)
def test_malformed_bias_specifications(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        BiasSpec.parse(text)


def test_an_unknown_random_control_mode_is_one_cli_line(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [f"--{name}={tmp_path / name}" for name in ("base-model", "adapter", "out")]
    args = ["debias", *paths, f"--bundle={tiny_bundle}", "--bias=item:popularity_group:MGU@5"]
    code, _, err = run_cli([*args, "--random-control", "maybe"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        "error: fudlr debias: Invalid value for '--random-control': must be one of off, "
        "report, require, not 'maybe'"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("item:colour:MGU@5", "no item has the attribute 'colour'"),
        ("user:shoe_size:NDCG@5", "no user has the attribute 'shoe_size'"),
        ("item:popularity_group:MGU@5000", "larger than the catalog"),
    ],
)
def test_specifications_the_bundle_cannot_support_fail_before_loading_a_model(
    tiny_model: Path, tiny_bundle: Path, tiny_adapter, text: str, message: str, monkeypatch
) -> None:
    from fudlr.recommender import recommend

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad specification")

    monkeypatch.setattr(recommend.Recommender, "load", no_model)
    config = DebiasConfig(biases=(BiasSpec.parse(text),))
    with pytest.raises(InputError, match=message):
        DebiasJob(tiny_model, tiny_adapter[0], Bundle.load(tiny_bundle), Path("none"), config)


def test_user_group_without_validation_users_is_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle_dir)
    bundle = Bundle.load(bundle_dir)
    # give one user a gender nobody else has and drop them from the validation split
    user = bundle.split("valid")[0].user_id
    users = [
        row.model_copy(update={"attributes": {**row.attributes, "gender": "X"}})
        if row.user_id == user
        else row
        for row in bundle.users.values()
    ]
    write_rows(bundle_dir / "users.jsonl", users)
    write_rows(bundle_dir / "valid.jsonl", [r for r in bundle.split("valid") if r.user_id != user])
    spec = BiasSpec.parse("user:gender:NDCG@5")
    with pytest.raises(InputError, match="group\\(s\\) X have no user in the valid split"):
        spec.groups(Bundle.load(bundle_dir))


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
    bundle_dir = planted_bundle(tiny_bundle, tmp_path / "bundle", copies=60)
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


@pytest.mark.parametrize(
    ("patience", "tried"),
    [(2, [1.0, 0.5, 0.25, 0.125, 1 / 16]), (None, [1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 32])],
)
def test_the_step_search_stops_after_sizes_worse_than_its_best(
    patience: int | None, tried: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Largest first: the overshooting sizes do not stop the search, a minimum followed by
    `step_patience` worse sizes does, and every size tried is reported best first."""
    from types import SimpleNamespace

    from fudlr.control import Control

    label = "item:popularity_group:MGU@5"
    # relative bias change on the query users at each η: overshoot, one minimum, fading
    changes = {1.0: 0.3, 0.5: -0.1, 0.25: -0.4, 0.125: -0.2, 1 / 16: -0.1, 1 / 32: -0.05}
    job = DebiasJob.__new__(DebiasJob)
    job.config = DebiasConfig(
        biases=(BiasSpec.parse(label),), step_sizes=tuple(changes), step_patience=patience
    )
    job.progress, job.timings, job._clock = Control(), {}, 0.0
    applied: list[float] = []
    patcher = SimpleNamespace(apply=applied.append, restore=lambda: None)
    job.measure = lambda split, rows: SimpleNamespace(
        biases={label: 1.0 + changes[applied[-1]]}, ndcg=0.1
    )
    monkeypatch.setattr("fudlr.repair.acceptance.share_changes", lambda *arguments: {})
    job.query_rows = []
    before = SimpleNamespace(biases={label: 1.0}, ndcg=0.1)
    trials = rank_step_sizes(job, patcher, before, {})
    assert applied == tried
    assert [trial.eta for trial in trials][:3] == [0.25, 0.125, 0.5]
    assert trials[0].improves and not trials[-1].improves


def test_the_guard_weighs_a_change_against_the_guard_users_noise(tiny_bundle: Path) -> None:
    """Paired bootstrap over users: no change is never a reduction, a change for every user
    always is, and a change for one user of 12 depends on that user being resampled."""
    bundle = Bundle.load(tiny_bundle)
    rows = bundle.split("valid")
    biases = (BiasSpec.parse("item:popularity_group:MGU@1"),)
    groups = item_groups(bundle.items, "popularity_group")
    popular = next(i for i in bundle.items if groups.names[-1] in groups.of(i))
    before_lists = {row.user_id: [popular] for row in rows}  # GP: all on the popular group
    # fairer: each user's recommendation from the group of the last item in its history
    fairer = {row.user_id: [row.history[-1]] for row in rows}
    history_share = group_shares((row.history for row in rows), groups)
    under_served = max(groups.names[:-1], key=history_share.__getitem__)
    other = next(i for i in bundle.items if under_served in groups.of(i))

    def measured(lists: dict[str, list[str]]):
        return measurement_of(bundle, "valid", rows, lists, biases, 1, len(rows))

    def no_reduction(lists: dict[str, list[str]]) -> float:
        return bootstrap_no_reduction(bundle, "valid", rows, before, measured(lists), biases)

    before = measured(before_lists)
    assert no_reduction(before_lists) == 1.0
    assert no_reduction(fairer) == 0.0
    one_user = dict(before_lists, **{rows[0].user_id: [other]})
    chance = no_reduction(one_user)  # the one user is left out with probability (11/12)^12
    assert 0.2 < chance < 0.5, chance
    after = measured(one_user)
    assert after.biases[biases[0].label] < before.biases[biases[0].label]
    accuracy = accuracy_check(rows, before, after, 0.5, 0.8)
    accepted, reason = verdict(before, after, biases, accuracy, chance, confidence=0.8)
    assert not accepted and "noise" in reason
    assert verdict(before, after, biases, accuracy, chance, confidence=0.0)[0]

    # against a random control: the selection must do better than the random samples' step
    fairer_after = measured(fairer)
    beaten = bootstrap_no_reduction(bundle, "valid", rows, before, fairer_after, biases)
    assert beats_control(before, fairer_after, before, biases, beaten, 0.8)[0]
    as_good = bootstrap_no_reduction(bundle, "valid", rows, fairer_after, after, biases)
    accepted, reason = beats_control(before, after, fairer_after, biases, as_good, 0.8)
    assert not accepted and "does as well" in reason
    # the same bias at another K: judged only against the job's tolerance
    label = biases[0].label
    was = replace(before, biases_at_k={label: {"1": 0.10, "5": 0.20}})
    slightly = replace(before, biases_at_k={label: {"1": 0.0, "5": 0.25}})
    doubled = replace(before, biases_at_k={label: {"1": 0.0, "5": 0.40}})
    assert other_k_check(was, slightly, biases, 0.5) == (True, "")
    accepted, reason = other_k_check(was, doubled, biases, 0.5)
    assert not accepted and "at K=5 rose +100.0% (0.2000 -> 0.4000" in reason
    # one user's change against a control that changed nothing: within the noise, as above
    accepted, reason = beats_control(before, after, before, biases, chance, 0.8)
    assert not accepted and "noise" in reason
