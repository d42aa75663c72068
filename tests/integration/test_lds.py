"""The LDS benchmark (bench/lds.py): its score on datamodels whose answer is known, and its
smoke profile end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.lds import Probe, damping_sweep, lds, main, random_subsets, ranks, spearman
from fudlr.data.bundle import Bundle
from fudlr.models.lora import load_adapter
from fudlr.models.store import load_base_model


def test_ranks_share_ties_and_spearman_is_undefined_without_spread() -> None:
    torch.testing.assert_close(
        ranks(torch.tensor([3.0, 1.0, 1.0, 7.0])), torch.tensor([2.0, 0.5, 0.5, 3.0]).double()
    )
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 5.0, 5.0])) is None
    assert spearman(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])) is None
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == -1.0


def test_lds_of_known_datamodels() -> None:
    """Retrained changes that are exactly the sum of the left-out samples' scores (or any
    increasing function of it) score 1; the same predictions matched to the wrong subsets
    score near 0; noise on the changes lowers the score in between."""
    generator = torch.Generator().manual_seed(0)
    samples, count = 60, 300
    kept = random_subsets(samples, count, 0.5, seed=1)
    assert kept.sum(dim=1).eq(30).all()
    assert len({tuple(row.tolist()) for row in kept}) == count
    scores = torch.randn(samples, 3, generator=generator, dtype=torch.float64)
    predicted = (~kept).double() @ scores
    assert lds(predicted, predicted) == pytest.approx([1.0] * 3)
    assert lds(predicted, torch.exp(predicted)) == pytest.approx([1.0] * 3)
    shuffled = predicted[torch.randperm(count, generator=generator)]
    assert all(abs(value) < 0.2 for value in lds(shuffled, predicted))
    noisy = predicted + predicted.std(dim=0) * torch.randn(
        count, 3, generator=generator, dtype=torch.float64
    )
    assert all(0.5 < value < 0.9 for value in lds(predicted, noisy))


def test_the_damping_sweep_chooses_on_the_first_half_and_holds_out_the_second() -> None:
    """Of two scorings (one per damping factor), the sweep picks the one whose predictions
    rank the first half of the subsets best, and reports its LDS on the second half."""
    generator = torch.Generator().manual_seed(0)
    samples, count = 40, 100
    removed = (~random_subsets(samples, count, 0.5, seed=2)).double()
    true = torch.randn(samples, 2, generator=generator, dtype=torch.float64)
    actual = removed @ true
    wrong = torch.randn(samples, 2, generator=generator, dtype=torch.float64)
    sweep = damping_sweep(["a", "b"], removed, actual, {1.0: wrong, 10.0: true})
    assert sweep["chosen_on_first_half"] == "10.0" == sweep["default"]
    assert sweep["factors"]["10.0"]["second_half"]["mean"] == pytest.approx(1.0)
    assert sweep["factors"]["1.0"]["mean"] < 0.5


@pytest.mark.slow
def test_quick_profile_writes_every_field(tmp_path: Path) -> None:
    """`python -m bench.lds --quick` end to end: the results carry every method's LDS for
    every query, the counts, the timings and the plot; the values the benchmark measures at
    an adapter are those a debias job's queries compute there."""
    main(["--quick", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")])
    folder = tmp_path / "results"
    results = json.loads((folder / "lds-quick-latest.json").read_text())
    assert (folder / f"lds-quick-{results['date']}-{results['commit']}.json").is_file()
    assert (folder / "plots" / "lds-quick-latest.png").stat().st_size > 0
    values = json.loads((folder / results["values_file"]).read_text())
    assert results["subsets"] == 4 and results["retrainings"] == 4
    names = values["names"]
    assert results["queries"] == len(names) == 5 + 3 + results["validation_users"]
    assert set(results["methods"]) == {
        "ekfac_dense",
        "ekfac_eigenbasis",
        "ekfac_eigenbasis_small",
        "identity",
    }
    for method in results["methods"].values():
        assert list(method["lds"]) == names
        assert all(value is None or -1 <= value <= 1 for value in method["lds"].values())
        assert method["mean"] is not None and method["user_loss_mean"] is not None
    small = results["methods"]["ekfac_eigenbasis_small"]["index"]["projection"]
    assert small["dim"] < results["methods"]["ekfac_dense"]["index"]["lora_weights"]
    sweep = results["damping_sweep"]
    assert sweep["default"] in sweep["factors"]
    assert sweep["factors"][sweep["default"]]["mean"] == results["methods"]["ekfac_dense"]["mean"]
    assert torch.tensor(values["retrained"]).shape == (4, 1, len(names))
    assert all(len(row) == 94 for row in values["left_out"])  # α = 0.5 of 188
    assert set(values["predicted"]) == set(results["methods"])
    actual = torch.tensor(values["retrained"]).mean(dim=1) - torch.tensor(values["full_adapter"])
    for name, method in results["methods"].items():
        recomputed = lds(torch.tensor(values["predicted"][name]), actual)
        assert recomputed == pytest.approx(list(method["lds"].values()))
    assert results["seconds"]["retraining"] > 0
    assert isinstance(results["target"]["met"], bool)

    work = tmp_path / "work" / "quick"
    probe = Probe.of(Bundle.load(work / "bundle"), temperature=1.0, seed=0)
    base, tokenizer = load_base_model(work / "model")
    model = load_adapter(base, work / "full", trainable=True)
    measured_names, measured = probe.measure(model, tokenizer)
    queries = probe.gradients(model, tokenizer)
    assert measured_names == queries.names == names
    torch.testing.assert_close(measured, queries.values)
    torch.testing.assert_close(measured, torch.tensor(values["full_adapter"]).double())
