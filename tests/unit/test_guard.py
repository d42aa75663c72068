"""The guard's accuracy check and its refusal of biases it cannot measure.

Accuracy is judged like the bias, in a paired bootstrap over the guard users: a drop the
users' noise explains passes, a real one is refused, and a budget smaller than one user's
hit is reported as unresolved. Biases without signal on the guard users fail the job
before any compute (CLI: one line; the API's refusal is in tests/integration/test_api.py),
unless the job may drop them (such a job runs in tests/integration/test_repair_job.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fudlr.data.bundle import Bundle
from fudlr.data.schema import SampleRow
from fudlr.fairness.bootstrap import resampled_users
from fudlr.fairness.groups import user_groups
from fudlr.fairness.metrics import ndcg_at_k
from fudlr.repair.config import (
    DebiasConfig,
    UnmeasurableBias,
    check_job,
    screened,
    unmeasurable_in_data,
)
from fudlr.repair.guard import (
    Measurement,
    accuracy_check,
    measurement_of,
    resolves,
    unmeasured_utility,
    verdict,
)
from fudlr.repair.spec import BiasSpec
from tests.conftest import run_cli

K, BUDGET, CONFIDENCE = 10, 0.05, 0.8
BIAS = BiasSpec.parse("item:popularity_group:MGU@5")


def _rows(users: int) -> list[SampleRow]:
    return [
        SampleRow(
            sample_id=f"s{u}",
            user_id=f"u{u}",
            history=["h"],
            target=f"t{u}",
            prompt="p",
            completion="c",
        )
        for u in range(users)
    ]


def _lists(rows: list[SampleRow], hits: set[int]) -> Measurement:
    """Top-K lists with the target first for the users in `hits`, missing for the rest."""
    lists = {
        row.user_id: ([row.target] if u in hits else []) + [f"x{i}" for i in range(K)]
        for u, row in enumerate(rows)
    }
    return Measurement({BIAS.label: 0.2}, {}, 0.0, 0.0, K, 0, {}, lists, {})


def _fairer(measurement: Measurement) -> Measurement:
    """The same lists with the bias halved: only accuracy can refuse the step."""
    measurement.biases = {BIAS.label: 0.1}
    return measurement


def test_a_drop_within_the_guard_users_noise_passes() -> None:
    rows = _rows(400)
    before = _lists(rows, set(range(40)))
    # 6 of 40 hits lost, 3 gained: 7.5% measured, beyond the 5% budget, but 9 users' flips
    after = _fairer(_lists(rows, set(range(6, 40)) | {100, 101, 102}))
    check = accuracy_check(rows, before, after, BUDGET, CONFIDENCE, seed=0)
    assert check.drop == pytest.approx(3 / 40)  # a raw comparison would refuse
    assert check.low < BUDGET < check.high and check.low <= check.drop <= check.high
    assert 0.3 < check.p_over_budget < CONFIDENCE, check
    assert check.resolved and check.hits_before == 40
    assert check.before == pytest.approx(40 / 400) and check.after == pytest.approx(37 / 400)
    accepted, reason = verdict(before, after, (BIAS,), check, 0.0, CONFIDENCE)
    assert accepted and "NDCG@10 drop +7.5%" in reason and "unresolved" not in reason, reason


def test_a_real_drop_is_refused() -> None:
    rows = _rows(400)
    before = _lists(rows, set(range(40)))
    after = _fairer(_lists(rows, set(range(20, 40))))  # half the hits lost, none gained
    check = accuracy_check(rows, before, after, BUDGET, CONFIDENCE, seed=0)
    assert check.drop == pytest.approx(0.5) and check.low > BUDGET
    assert check.p_over_budget == 1.0 and check.refuses(CONFIDENCE)
    accepted, reason = verdict(before, after, (BIAS,), check, 0.0, CONFIDENCE)
    assert not accepted and reason.startswith("accuracy budget exceeded: NDCG@10 drop +50.0%")
    # guard_confidence 0: the measured drop alone decides, as before the bootstrap
    small = accuracy_check(
        rows, before, _lists(rows, set(range(1, 40))), BUDGET, CONFIDENCE, seed=0
    )
    assert small.drop == pytest.approx(1 / 40) and not small.refuses(0.0)
    assert check.refuses(0.0)


def test_a_budget_finer_than_one_hit_is_reported_unresolved() -> None:
    rows = _rows(256)  # the case: a handful of hits at chance-level accuracy
    before = _lists(rows, set(range(10)))
    after = _fairer(_lists(rows, set(range(1, 10))))  # one user's hit lost: 10%
    check = accuracy_check(rows, before, after, BUDGET, CONFIDENCE, seed=0)
    assert check.hits_before == 10 and not check.resolved  # 10 hits x 5% < one hit
    assert check.drop == pytest.approx(0.1) and check.p_over_budget < CONFIDENCE
    accepted, reason = verdict(before, after, (BIAS,), check, 0.0, CONFIDENCE)
    assert accepted and "the accuracy budget is unresolved: 10 hit(s) before" in reason, reason
    # the same users resolve a budget that losing twice its worth of hits would exceed
    # with the guard's confidence; a surer guard needs more hits, one that judges the
    # measured drop alone only one hit's worth
    assert accuracy_check(rows, before, after, 0.15, CONFIDENCE, seed=0).resolved
    assert not resolves(10, 0.1, CONFIDENCE) and resolves(10, 0.1, 0.0)
    assert resolves(40, BUDGET, CONFIDENCE) and not resolves(40, BUDGET, 0.95)


def test_accuracy_is_judged_on_the_bias_bootstraps_resamples() -> None:
    rows = _rows(50)
    before, after = _lists(rows, set(range(10))), _lists(rows, set(range(3, 12)))
    check = accuracy_check(rows, before, after, BUDGET, CONFIDENCE, seed=3, resamples=200)
    over = 0
    for resampled in resampled_users(rows, 3, 200):  # the helper bootstrap_no_reduction uses
        was = sum(ndcg_at_k(before.top_lists[r.user_id], r.target, K) for r in resampled)
        now = sum(ndcg_at_k(after.top_lists[r.user_id], r.target, K) for r in resampled)
        over += was > 0 and (was - now) / was > BUDGET
    assert check.p_over_budget == over / 200
    assert list(resampled_users(rows, 3, 2)) == list(resampled_users(rows, 3, 2))


def test_biases_the_guard_users_cannot_measure(tiny_bundle: Path) -> None:
    bundle = Bundle.load(tiny_bundle)
    genres = BiasSpec.parse("item:genres:MGU@5")  # no tiny validation history has a Mystery
    config = DebiasConfig(biases=(BIAS, genres))
    groups = {bias.label: bias.groups(bundle, "valid") for bias in config.biases}
    reasons = unmeasurable_in_data(bundle, config, groups)
    assert list(reasons) == [genres.label] and "Mystery" in reasons[genres.label]
    with pytest.raises(UnmeasurableBias, match="bias item:genres:MGU@5 cannot be measured") as e:
        check_job(bundle, config)
    assert e.value.position == 1
    kept, dropped = screened(DebiasConfig(biases=(BIAS, genres), drop_unmeasurable=True), reasons)
    assert kept.biases == (BIAS,) and dropped == [
        {"bias": genres.label, "reason": reasons[genres.label]}
    ]
    with pytest.raises(UnmeasurableBias, match="no other bias is left"):
        check_job(bundle, DebiasConfig(biases=(genres,), drop_unmeasurable=True))

    # a user group without a hit among the guard users: known only once they are measured
    rows = bundle.split("valid")
    gender = BiasSpec.parse("user:gender:NDCG@5")
    of = user_groups(bundle.users, "gender")
    catalog = list(bundle.items)

    def measured(hit_genders: set[str]) -> Measurement:
        lists = {}
        for row in rows:
            others = [i for i in catalog if i != row.target][:K]
            hit = set(of.of(row.user_id)) & hit_genders
            lists[row.user_id] = ([row.target] if hit else []) + others
        return measurement_of(bundle, "valid", rows, lists, (BIAS, gender), K, 0)

    assert unmeasured_utility(measured({"F", "M"}), (BIAS, gender)) == {}
    reasons = unmeasured_utility(measured({"M"}), (BIAS, gender))
    assert (
        list(reasons) == [gender.label]
        and "user group(s) F have NDCG@5 = 0" in reasons[gender.label]
    )


def test_an_unmeasurable_bias_is_one_cli_line(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [f"--{name}={tmp_path / name}" for name in ("base-model", "adapter", "out")]
    args = ["debias", *paths, f"--bundle={tiny_bundle}", f"--bias={BIAS.label}"]
    code, _, err = run_cli([*args, "--bias=item:genres:MGU@5"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: bias item:genres:MGU@5 cannot be measured: item group(s) Mystery are absent"
    ), lines
    assert "--drop-unmeasurable" in lines[0]
    code, _, err = run_cli(
        [
            "debias",
            *paths,
            f"--bundle={tiny_bundle}",
            "--bias=item:genres:MGU@5",
            "--drop-unmeasurable",
        ],
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no other bias" in err
    assert not (tmp_path / "out").exists()
