"""The repair's decisions without a trained model: bias specifications and what a bundle can
support, refusals before any compute, the step search's stopping rule, the guard's bootstrap
and the queries' item pools."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from fudlr.data.bundle import Bundle
from fudlr.data.jsonl import write_rows
from fudlr.errors import InputError
from fudlr.fairness.groups import item_groups
from fudlr.fairness.metrics import group_shares
from fudlr.fairness.surrogates import sample_pools
from fudlr.influence.projection import Projection
from fudlr.repair.acceptance import rank_step_sizes
from fudlr.repair.config import DebiasConfig
from fudlr.repair.guard import (
    accuracy_check,
    beats_control,
    bootstrap_no_reduction,
    measurement_of,
    other_k_check,
    verdict,
)
from fudlr.repair.pipeline import DebiasJob
from fudlr.repair.spec import BiasSpec
from tests.conftest import run_cli


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
    tiny_model: Path, tiny_bundle: Path, text: str, message: str, monkeypatch
) -> None:
    from fudlr.recommender import recommend

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad specification")

    monkeypatch.setattr(recommend.Recommender, "load", no_model)
    config = DebiasConfig(biases=(BiasSpec.parse(text),))
    with pytest.raises(InputError, match=message):
        DebiasJob(tiny_model, Path("none"), Bundle.load(tiny_bundle), Path("none"), config)


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


def test_a_job_asking_for_another_projection_is_refused() -> None:
    from fudlr.errors import InputError
    from fudlr.repair.config import check_projection

    check_projection(Projection.EIGENBASIS, None)
    check_projection(Projection.DENSE, Projection.DENSE)
    with pytest.raises(InputError, match="stores dense gradients but the job asks for eigenbasis"):
        check_projection(Projection.DENSE, Projection.EIGENBASIS)


def test_anchored_pools_hold_the_anchor_once_and_still_count_the_whole_catalog(
    tiny_bundle: Path,
) -> None:
    """With equal scores the pool's importance weights sum to the catalog size, anchors or
    not: sampling the strata among the remaining items keeps the estimate unbiased."""
    bundle = Bundle.load(tiny_bundle)
    groups = item_groups(bundle.items, "popularity_group")
    rows = bundle.split("valid")[:3]
    anchors = [[row.history[0], row.history[0]] for row in rows]  # a repeat counts once
    for pools in (
        sample_pools(rows, groups, per_stratum=2, seed=0),
        sample_pools(rows, groups, per_stratum=2, seed=0, anchors=anchors),
    ):
        for pool in pools:
            assert len(set(pool.items)) == len(pool.items)
            assert float(pool.log_weights.exp().sum()) == pytest.approx(len(bundle.items))
    for row, pool in zip(rows, pools, strict=True):
        assert pool.items[0] == row.history[0] and float(pool.log_weights[0]) == 0.0
