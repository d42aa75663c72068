"""The systems benchmark end to end on the tiny model, scenario by scenario: one run of every
system, the scaling sweep and the service (run once for the module), the files it writes,
and the runs written again from its records."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from bench.common import run_of
from bench.compare import run_and_write
from bench.report import markdown, selection_seconds
from bench.systems import SYSTEMS, BenchProfile, SystemsBench
from fudlr.fairness.metrics import DEFAULT_KS
from tests.conftest import PLANTED_COPIES, planted_bundle

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"
PROFILE = BenchProfile(
    name="tiny",
    train_size=10_000,
    scaling_sizes=(40, 10_000),
    test_users=None,
    guard_users=12,
    query_users=12,
    curvature_samples=32,
    estimate="seconds",
    k=1,
    num_beams=2,
    epochs=3,
    learning_rate=3e-2,
    max_ndcg_drop=0.5,
)


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The Markdown tables in `text` by their first column's header, each as rows of
    {header: cell}."""
    lines = text.splitlines()
    found = {}
    for number, line in enumerate(lines):
        if not line.startswith("|---"):
            continue
        header = _cells(lines[number - 1])
        rows = []
        for row in lines[number + 1 :]:
            if not row.startswith("|"):
                break
            rows.append(dict(zip(header, _cells(row), strict=True)))
        found[header[0]] = rows
    return found


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def list_items(text: str) -> list[str]:
    return [line[2:] for line in text.splitlines() if line.startswith("- ")]


@dataclass
class Bench:
    """The tiny benchmark's inputs and its first run's results, written under `root`."""

    model: Path
    bundle: Path
    root: Path
    results: dict[str, Any]

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def folder(self) -> Path:
        return self.root / "results"

    @property
    def systems(self) -> dict[str, Any]:
        return self.results["systems"]

    def written_from(
        self,
        source: Path,
        out: str,
        scaling_sizes: tuple[int, ...] = (),
        rerun: Sequence[str] = (),
        work: Path | None = None,
    ) -> dict[str, Any]:
        """The results written from recorded systems, without the service run."""
        profile = replace(PROFILE, scaling_sizes=scaling_sizes, service=False)
        return run_and_write(
            profile,
            self.model,
            self.bundle,
            work or self.work,
            self.root / out,
            systems_from=source,
            rerun=rerun,
        )


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_bundle: Path) -> Bench:
    """Every system, the sweep and the service on the tiny bundle with a planted bias."""
    root = tmp_path_factory.mktemp("bench")
    bundle = planted_bundle(tiny_bundle, root / "bundle", copies=PLANTED_COPIES)
    results = run_and_write(PROFILE, tiny_model, bundle, root / "work", root / "results")
    return Bench(tiny_model, bundle, root, results)


@pytest.fixture(scope="module")
def swept(bench: Bench) -> dict[str, Any]:
    """The systems of the first run's results file, followed by the scaling sweep at the full
    size (the recorded FUDLR job)."""
    return bench.written_from(bench.folder / "latest.json", "swept", (bench.results["train_size"],))


@pytest.fixture(scope="module")
def rerun(bench: Bench) -> dict[str, Any]:
    """fudlr_multi run again from the recorded systems, in a work folder that holds only the
    original adapter (all such a system needs)."""
    work = bench.root / "rerun-work"
    shutil.copytree(bench.work / "original", work / "original")
    latest = bench.folder / "latest.json"
    return bench.written_from(latest, "rerun", rerun=["fudlr_multi"], work=work)


def test_every_system_is_measured_on_the_same_test_users(bench: Bench) -> None:
    assert list(bench.systems) == list(SYSTEMS)
    for name, system in bench.systems.items():
        assert system["metrics"] is not None, (name, system.get("skipped"))
        assert system["seconds"] > 0, name
        assert system["metrics"]["users"] == bench.results["test_users"], name
        assert set(system["metrics"]["k"]) == {str(k) for k in DEFAULT_KS}, name
        assert system["metrics"]["item_groups"] == "popularity_group"
        assert system["metrics_genres"]["item_groups"] == "genres"


def test_fudlr_selects_the_planted_block_and_the_baselines_remove_as_many(bench: Bench) -> None:
    fudlr = bench.systems["fudlr"]
    assert fudlr["removed"] > 0, "the planted block must be selected for the comparison"
    # selected only because the selection beat random samples on held-out query users
    assert fudlr["eligibility_test"] == "selection" and fudlr["selection_test"]["p"] <= 0.05
    assert bench.systems["retrain_without_s"]["removed"] == fudlr["removed"]
    assert bench.systems["random_removal"]["removed"] == fudlr["removed"]
    assert fudlr["index_seconds"] > 0 and bench.systems["fudlr_multi"]["index_seconds"] > 0


def test_the_two_bias_job_predicts_both_or_says_why_it_dropped_one(bench: Bench) -> None:
    # the gender gap is left out when the 12 guard users give one gender no hit at K=1
    multi = bench.systems["fudlr_multi"]
    assert "item:popularity_group:MGU@1:after" in multi["predicted"]
    dropped = {entry["bias"]: entry["reason"] for entry in multi["dropped_biases"]}
    assert "user:gender:NDCG@1:after" in multi["predicted"] or "NDCG@1 = 0" in dropped.get(
        "user:gender:NDCG@1", ""
    ), (multi["predicted"].keys(), dropped)


def test_the_reranking_tries_alpha_zero_first(bench: Bench) -> None:
    rr = bench.systems["ifairlrs_rr"]
    alphas = [candidate["alpha"] for candidate in rr["candidates"]]
    assert alphas[0] == 0.0 and rr["alpha"] in alphas
    if rr["alpha"] == 0.0:  # no reranking chosen: exactly the original's lists
        assert rr["metrics"] == bench.systems["original"]["metrics"]


def test_the_most_popular_reference_is_measured_on_the_same_users(bench: Bench) -> None:
    reference = bench.results["references"]["most_popular"]
    assert reference["metrics"]["users"] == bench.results["test_users"]
    assert reference["metrics"]["k"]["1"]["GP"]["4"] == 1.0  # every top 1 from the top group


def test_the_targets_are_read_from_the_systems_numbers(bench: Bench) -> None:
    systems, targets = bench.systems, bench.results["targets"]
    original = systems["original"]["metrics"]["k"]["1"]
    fudlr = systems["fudlr"]["metrics"]["k"]["1"]
    fairness = targets["MGU@1 cut >= 30% with NDCG@1 drop <= 5%"]
    assert fairness["MGU_change"] == pytest.approx(fudlr["MGU"] / original["MGU"] - 1)
    original_hits = round(original["HR"] * bench.results["test_users"])
    assert fairness["hits"]["original"] == original_hits
    assert fairness["accuracy_resolved"] == (original_hits > 20)
    rw = systems["ifairlrs_rw"]["metrics"]["k"]["1"]
    points = targets["not dominated by IFairLRS RW"]
    assert points["ifairlrs_rw"] == {"MGU": rw["MGU"], "NDCG": rw["NDCG"]}
    assert points["fudlr"] == {"MGU": fudlr["MGU"], "NDCG": fudlr["NDCG"]}
    speed = targets["job <= 1/10 of retraining"]
    assert speed["ratio"] == systems["fudlr"]["seconds"] / systems["original"]["seconds"]
    assert speed["met"] == (speed["ratio"] <= 0.1)
    assert all(isinstance(target["met"], bool) for target in targets.values())


def test_every_system_has_its_changes_against_the_original_with_intervals(
    bench: Bench,
) -> None:
    """The paired bootstrap's point estimates are the systems' own metric differences on
    the same test users, and each interval holds its estimate."""
    systems, changes = bench.systems, bench.results["changes"]
    measured = [name for name, system in systems.items() if system.get("metrics")]
    assert set(changes) == set(measured) - {"original"}
    original = systems["original"]["metrics"]["k"]
    for name, change in changes.items():
        metrics = systems[name]["metrics"]["k"]
        assert set(change) == {"NDCG@10", "MGU@1", "MGU@5", "MGU@10"}
        # the metrics are reported to 6 decimals, the changes from the unrounded values
        assert change["NDCG@10"]["mean"] == pytest.approx(
            metrics["10"]["NDCG"] - original["10"]["NDCG"], abs=2e-6
        )
        for k in ("1", "5", "10"):
            mgu = change[f"MGU@{k}"]
            assert mgu["mean"] == pytest.approx(metrics[k]["MGU"] - original[k]["MGU"], abs=2e-6)
            assert mgu["users"] == bench.results["test_users"]
        for interval in change.values():
            assert interval["low"] <= interval["high"]
            assert 0.0 <= interval["p_not_above"] <= 1.0
    rows = tables((bench.folder / "latest.md").read_text())["change of"]
    assert {row["change of"] for row in rows} == set(changes)


def test_the_fidelity_reads_the_fudlr_job(bench: Bench) -> None:
    fidelity, fudlr = bench.results["fidelity"], bench.systems["fudlr"]
    assert fidelity["available"] and fidelity["removed"] == fudlr["removed"]
    assert fidelity["guard_eta"] == fudlr["guard"][0]["eta"]


def test_the_sweep_ends_at_the_full_job_and_the_service_ran(bench: Bench) -> None:
    results = bench.results
    small, full = results["scaling"]
    assert (small["train_size"], full["train_size"]) == (40, results["train_size"])
    assert full["job_seconds"] == bench.systems["fudlr"]["seconds"]  # the recorded job
    assert small["retraining_seconds"] > 0 and small["job_seconds"] > 0
    assert results["service"]["state"] in {"succeeded", "failed"}
    assert results["service"]["job_seconds"] > 0


def test_the_files_hold_the_results(bench: Bench) -> None:
    results, folder = bench.results, bench.folder
    assert json.loads((folder / "latest.json").read_text()) == json.loads(json.dumps(results))
    dated = folder / f"{results['date']}-tiny-{results['commit']}.json"
    assert dated.read_text() == (folder / "latest.json").read_text()
    assert (folder / "latest.md").read_text() == markdown(results)
    for name in ("plane", "shares", "times", "scaling"):
        assert (folder / "plots" / f"latest-{name}.png").read_bytes().startswith(PNG)


def test_the_systems_table_shows_each_systems_numbers(bench: Bench) -> None:
    rows = tables((bench.folder / "latest.md").read_text())["system"]
    assert [row["system"] for row in rows] == [*SYSTEMS, "most_popular (reference)"]
    users = bench.results["test_users"]
    reference = {**bench.results["references"]["most_popular"], "seconds": None}
    for row, system in zip(rows, [*bench.systems.values(), reference], strict=True):
        if system["metrics"] is None:  # skipped: an empty row
            assert row["NDCG@1"] == row["seconds"] == "", row
            continue
        at_1 = system["metrics"]["k"]["1"]
        assert row["NDCG@1"] == f"{at_1['NDCG']:.4f}"
        assert row["HR@1"] == f"{at_1['HR']:.4f} ({round(at_1['HR'] * users)})"
        assert row["MGU@1"] == f"{at_1['MGU']:.4f}"
        assert row["MGU@1 genres"] == f"{system['metrics_genres']['k']['1']['MGU']:.4f}"
        assert row["gender gap NDCG@1"] == f"{at_1['user_gap']['NDCG']:.4f}"
        # the reference runs no model
        assert row["seconds"] == ("–" if system["seconds"] is None else f"{system['seconds']:.0f}")


def test_a_run_stopped_after_its_systems_is_written_from_its_partial_file(bench: Bench) -> None:
    partial = bench.written_from(bench.work / "systems.partial.json", "recovered")
    assert json.loads(json.dumps(partial["systems"])) == json.loads(json.dumps(bench.systems))
    assert partial["scaling"] == [] and "service" not in partial
    assert partial["targets"] == bench.results["targets"]
    recovered = bench.root / "recovered"
    assert "training samples" not in tables((recovered / "latest.md").read_text())
    assert not (recovered / "plots" / "latest-scaling.png").exists()  # no older run's plot


def test_systems_from_a_results_file_are_followed_by_the_sweep(
    bench: Bench, swept: dict[str, Any]
) -> None:
    results, fudlr = bench.results, bench.systems["fudlr"]
    assert swept["systems_from"]["commit"] == results["commit"]
    assert swept["references"] == results["references"]
    [point] = swept["scaling"]
    assert point["job_seconds"] == fudlr["seconds"]
    assert point["index_seconds"] == fudlr["index_seconds"]
    assert point["retraining_seconds"] == bench.systems["original"]["seconds"]
    # up to its selection: the stages every job runs, part of the job's time
    up_to_selection = selection_seconds(point["job_stages"])
    assert 0 < up_to_selection < point["job_seconds"]
    [row] = tables((bench.root / "swept" / "latest.md").read_text())["training samples"]
    assert row["training samples"] == str(results["train_size"])
    assert row["job s"] == f"{point['job_seconds']:.0f}"
    assert row["job up to its selection s"] == f"{up_to_selection:.0f}"


def test_the_service_run_is_carried_with_the_run_that_measured_it(
    bench: Bench, swept: dict[str, Any]
) -> None:
    # this run swept again, so only the service run comes from the recorded results
    assert swept["service"] == bench.results["service"]
    assert swept["scaling"] != bench.results["scaling"]
    assert swept["carried"] == {"service": run_of(bench.results)}


def test_a_file_written_again_keeps_its_measuring_run_and_corrections(
    bench: Bench, swept: dict[str, Any]
) -> None:
    # written again from the swept file (say, at a later commit, with a correction): the
    # systems still name the run that measured them, and the correction stays
    corrected = bench.root / "corrected.json"
    corrected.write_text(
        json.dumps({**swept, "commit": "later", "corrections": ["measured again"]})
    )
    again = bench.written_from(corrected, "again")
    assert again["systems_from"]["commit"] == bench.results["commit"]
    assert again["systems_from"]["machine"] == bench.results["machine"]
    assert again["corrections"] == ["measured again"]
    assert "measured again" in list_items((bench.root / "again" / "latest.md").read_text())
    assert "measured again" not in list_items((bench.folder / "latest.md").read_text())
    # the sweep and the service run carry over, each naming the run that measured it
    assert again["scaling"] == swept["scaling"] and again["carried"]["scaling"]["commit"] == "later"
    assert again["carried"]["service"]["commit"] == bench.results["commit"]  # kept through carries


def test_a_system_run_again_gives_its_recorded_results(bench: Bench, rerun: dict[str, Any]) -> None:
    # the seeded recipe gives the recorded system's results again
    multi, recorded = rerun["systems"]["fudlr_multi"], bench.systems["fudlr_multi"]
    assert multi["metrics"] == json.loads(json.dumps(recorded["metrics"]))
    assert multi["removed"] == recorded["removed"]
    assert rerun["systems"]["fudlr"] == json.loads(json.dumps(bench.systems["fudlr"]))
    assert rerun["original_adapter"] == {"retrained": False}
    assert rerun["systems_from"]["rerun"]["fudlr_multi"]["commit"] == rerun["commit"]


def test_who_ran_a_system_again_stays_recorded(bench: Bench, rerun: dict[str, Any]) -> None:
    later = bench.root / "rerun.json"
    later.write_text(json.dumps({**rerun, "commit": "later"}))
    carried = bench.written_from(later, "carried")
    assert carried["systems_from"]["rerun"] == rerun["systems_from"]["rerun"]


def test_only_the_rerunnable_systems_run_again(bench: Bench) -> None:
    systems = SystemsBench(PROFILE, bench.model, bench.bundle, bench.work, print)
    with pytest.raises(ValueError, match="cannot run fudlr alone"):
        systems.recorded(bench.folder / "latest.json", rerun=["fudlr"])


def test_a_fresh_machine_trains_the_original_again_to_the_same_weights(
    bench: Bench, tmp_path: Path
) -> None:
    # the service run needs the original adapter: a work folder without it trains it again
    profile = replace(PROFILE, scaling_sizes=())
    systems = SystemsBench(profile, bench.model, bench.bundle, tmp_path / "work", print)
    recorded = systems.recorded(bench.folder / "latest.json")
    assert recorded["original_adapter"] == {"retrained": True, "same_adapter": True}
    assert systems.original_adapter() == {"retrained": False}
