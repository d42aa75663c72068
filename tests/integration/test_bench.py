"""The systems benchmark end to end on the tiny model: every system, the service, the files."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from bench.compare import run_and_write
from bench.report import markdown, selection_seconds
from bench.systems import SYSTEMS, BenchProfile, SystemsBench
from fudlr.fairness.metrics import DEFAULT_KS
from tests.conftest import planted_bundle

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_benchmark_runs_every_system_and_writes_its_results(
    tmp_path: Path, tiny_model: Path, tiny_bundle: Path
):
    bundle = planted_bundle(tiny_bundle, tmp_path / "bundle", copies=120)
    profile = BenchProfile(
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
    results = run_and_write(profile, tiny_model, bundle, tmp_path / "work", tmp_path / "results")

    systems = results["systems"]
    assert list(systems) == list(SYSTEMS)
    fudlr = systems["fudlr"]
    assert fudlr["removed"] > 0, "the planted block must be selected for the comparison"
    for name, system in systems.items():
        assert system["seconds"] > 0, name
        assert set(system["metrics"]["k"]) == {str(k) for k in DEFAULT_KS}, name
        assert system["metrics"]["item_groups"] == "popularity_group"
        assert system["metrics_genres"]["item_groups"] == "genres"
    assert systems["retrain_without_s"]["removed"] == fudlr["removed"]
    assert systems["random_removal"]["removed"] == fudlr["removed"]
    assert fudlr["index_seconds"] > 0 and systems["fudlr_multi"]["index_seconds"] > 0
    # both biases at once, or the gender gap left out because the 12 guard users give one
    # gender no hit at K=1 (and the report says so)
    multi = systems["fudlr_multi"]
    assert "item:popularity_group:MGU@1:after" in multi["predicted"]
    dropped = {entry["bias"]: entry["reason"] for entry in multi["dropped_biases"]}
    assert "user:gender:NDCG@1:after" in multi["predicted"] or "NDCG@1 = 0" in dropped.get(
        "user:gender:NDCG@1", ""
    ), (multi["predicted"].keys(), dropped)
    rr = systems["ifairlrs_rr"]
    assert rr["candidates"][0]["alpha"] == 0.0 and rr["alpha"] in {
        c["alpha"] for c in rr["candidates"]
    }
    if rr["alpha"] == 0.0:  # no reranking chosen: exactly the original's lists
        assert rr["metrics"] == systems["original"]["metrics"]

    # the most-popular reference: on the same test users, from the catalog's counts alone
    reference = results["references"]["most_popular"]
    assert reference["metrics"]["users"] == results["test_users"]
    assert reference["metrics"]["k"]["1"]["GP"]["4"] == 1.0  # every top 1 from the top group
    fairness = results["targets"]["MGU@1 cut >= 30% with NDCG@1 drop <= 5%"]
    original_hits = round(systems["original"]["metrics"]["k"]["1"]["HR"] * results["test_users"])
    assert fairness["hits"]["original"] == original_hits
    assert fairness["accuracy_resolved"] == (original_hits > 20)

    ratio = results["targets"]["job <= 1/10 of retraining"]["ratio"]
    assert ratio == fudlr["seconds"] / systems["original"]["seconds"]
    assert all(isinstance(target["met"], bool) for target in results["targets"].values())
    assert results["fidelity"]["available"] and results["fidelity"]["removed"] == fudlr["removed"]
    assert [p["train_size"] for p in results["scaling"]] == [40, results["train_size"]]
    assert results["service"]["state"] in {"succeeded", "failed"}
    assert results["service"]["job_seconds"] > 0

    folder = tmp_path / "results"
    assert json.loads((folder / "latest.json").read_text()) == json.loads(json.dumps(results))
    dated = folder / f"{results['date']}-tiny-{results['commit']}.json"
    assert dated.read_text() == (folder / "latest.json").read_text()
    assert (folder / "latest.md").read_text() == markdown(results)
    assert "| most_popular (reference) |" in markdown(results)
    test = fudlr["selection_test"]  # the planted block is selected only if the test passed
    assert fudlr["eligibility_test"] == "selection" and test["p"] <= 0.05
    assert f"- fudlr: {fudlr['eligible']} candidates; the selection beat" in markdown(results)
    assert "Corrected after the run" not in markdown(results)
    assert "- measured again" in markdown({**results, "corrections": ["measured again"]})
    for name in ("plane", "shares", "times", "scaling"):
        assert (folder / "plots" / f"latest-{name}.png").read_bytes().startswith(PNG)

    work = tmp_path / "work"

    def written_from(source: Path, out: str, scaling_sizes: tuple[int, ...] = ()) -> dict:
        """The results written from recorded systems, without the service run."""
        changed = replace(profile, scaling_sizes=scaling_sizes, service=False)
        return run_and_write(changed, tiny_model, bundle, work, tmp_path / out, systems_from=source)

    # a run stopped after its systems: its recorded systems are written as they are
    partial = written_from(work / "systems.partial.json", "recovered")
    assert json.loads(json.dumps(partial["systems"])) == json.loads(json.dumps(systems))
    assert partial["scaling"] == [] and "service" not in partial
    assert partial["targets"] == results["targets"]
    recovered = tmp_path / "recovered"
    assert "Not measured in this run." in (recovered / "latest.md").read_text()
    assert not (recovered / "plots" / "latest-scaling.png").exists()
    # ... or the systems of another run's results, followed by the scaling sweep (its full
    # size is the recorded FUDLR job)
    swept = written_from(folder / "latest.json", "swept", (results["train_size"],))
    assert swept["systems_from"]["commit"] == results["commit"]
    assert swept["references"] == results["references"]
    # written again from that file (say, at a later commit, with a correction): the systems
    # still name the run that measured them, and the correction stays
    (folder / "corrected.json").write_text(
        json.dumps({**swept, "commit": "later", "corrections": ["measured again"]})
    )
    again = written_from(folder / "corrected.json", "again")
    assert again["systems_from"]["commit"] == results["commit"]
    assert again["systems_from"]["machine"] == results["machine"]
    assert f"commit {results['commit']}" in (tmp_path / "again" / "latest.md").read_text()
    assert again["corrections"] == ["measured again"]
    # the sweep and the service run of a recorded run carry over where a later run skips
    # them, naming the run that measured them
    assert swept["service"] == results["service"] and swept["scaling"] != results["scaling"]
    assert swept["carried"] == {
        "service": {key: results[key] for key in ("commit", "date", "machine")}
    }
    assert again["scaling"] == swept["scaling"] and again["carried"]["scaling"]["commit"] == "later"
    assert again["carried"]["service"]["commit"] == results["commit"]  # kept through carries
    assert "The service was measured by the run at commit" in markdown(again)
    [point] = swept["scaling"]
    assert point["job_seconds"] == fudlr["seconds"]
    assert point["index_seconds"] == fudlr["index_seconds"]
    assert point["retraining_seconds"] == systems["original"]["seconds"]
    # up to its selection: the stages every job runs, part of the job's time
    up_to_selection = selection_seconds(point["job_stages"])
    assert 0 < up_to_selection < point["job_seconds"]
    assert f"| {up_to_selection:.0f} |" in (tmp_path / "swept" / "latest.md").read_text()

    # a system run again from recorded systems (the original adapter and its index are
    # all it needs): this seeded recipe gives the recorded system's results again
    rerun = run_and_write(
        replace(profile, scaling_sizes=(), service=False),
        tiny_model,
        bundle,
        work,
        tmp_path / "rerun",
        systems_from=folder / "latest.json",
        rerun=["fudlr_multi"],
    )
    multi, recorded_multi = rerun["systems"]["fudlr_multi"], systems["fudlr_multi"]
    assert rerun["systems_from"]["rerun"]["fudlr_multi"]["commit"] == rerun["commit"]
    assert rerun["original_adapter"] == {"retrained": False}
    assert multi["metrics"] == json.loads(json.dumps(recorded_multi["metrics"]))
    assert multi["removed"] == recorded_multi["removed"]
    assert rerun["systems"]["fudlr"] == json.loads(json.dumps(fudlr))  # the others as recorded
    assert "System fudlr_multi was measured by the run at" in markdown(rerun)
    (folder / "rerun.json").write_text(json.dumps({**rerun, "commit": "later"}))
    carried = written_from(folder / "rerun.json", "carried")  # who ran it stays said
    assert carried["systems_from"]["rerun"] == rerun["systems_from"]["rerun"]
    with pytest.raises(ValueError, match="cannot run fudlr alone"):
        SystemsBench(profile, tiny_model, bundle, work, print).recorded(
            folder / "latest.json", rerun=["fudlr"]
        )

    # on a fresh machine the service run trains the original again: the same weights
    bench = SystemsBench(profile, tiny_model, bundle, work, print)
    bench.recorded(folder / "latest.json")
    assert bench.original_adapter() == {"retrained": False}
    shutil.rmtree(work / "original")
    assert bench.original_adapter() == {"retrained": True, "same_adapter": True}
