"""GDRT: its group-DRO loss, its token groups, the history-free prompt, training with it,
and its system in the benchmark (settings chosen on validation, rerun from recorded ones)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.systems import PROFILES, SYSTEMS, SystemsBench
from fudlr.baselines.gdrt import (
    GdrtSettings,
    GroupDroLoss,
    Trial,
    choose_settings,
    group_dro_loss,
    history_gains,
    prompt_without_history,
    quantile_groups,
    train_gdrt,
)
from fudlr.data.bundle import Bundle
from fudlr.errors import InputError
from fudlr.models.lora import load_adapter
from fudlr.models.store import load_base_model
from fudlr.recommender.encoding import (
    collate,
    completion_nll,
    encode_completion,
    encode_sample,
    sample_means,
)
from fudlr.recommender.scoring import score_completions
from fudlr.recommender.train import TRAIN_MANIFEST, TrainConfig, train_adapter

# token NLLs of a hand-made batch; group -1 marks padding and prompt positions
NLL = torch.tensor([[9.0, 1.0, 3.0, 4.0], [9.0, 9.0, 2.0, 6.0]], dtype=torch.float64)
GROUPS = torch.tensor([[-1, 0, 0, 2], [-1, -1, 0, 2]])
# group 0: tokens 1, 3, 2 (mean 2); group 1 absent; group 2: tokens 4, 6 (mean 5)


def test_the_loss_is_the_closed_form_of_kl_regularised_group_dro():
    nll = NLL.clone().requires_grad_()
    loss = group_dro_loss(nll, GROUPS, tau=1.0)
    assert loss.item() == pytest.approx(math.log((math.exp(2.0) + math.exp(5.0)) / 2))
    # its gradient is the adversary's softmax weight of each group, shared by its tokens
    loss.backward()
    q0, q2 = torch.softmax(torch.tensor([2.0, 5.0]), dim=0).tolist()
    expected = [[0, q0 / 3, q0 / 3, q2 / 2], [0, 0, q0 / 3, q2 / 2]]
    torch.testing.assert_close(nll.grad, torch.tensor(expected, dtype=torch.float64))
    # τ → 0: the worst group alone; τ → ∞: the groups' mean (not the tokens' mean, 16/5)
    assert group_dro_loss(NLL, GROUPS, tau=1e-4).item() == pytest.approx(5.0, abs=1e-3)
    assert group_dro_loss(NLL, GROUPS, tau=1e4).item() == pytest.approx(3.5, abs=1e-3)
    values = [group_dro_loss(NLL, GROUPS, tau).item() for tau in (0.1, 0.5, 1.0, 3.0, 30.0)]
    assert values == sorted(values, reverse=True) and 3.5 < values[-1] < values[0] < 5.0


def test_the_hook_puts_each_sample_s_groups_under_its_completion_tokens():
    mask = GROUPS >= 0
    token_groups = {"a": torch.tensor([0, 0, 2]), "b": torch.tensor([0, 2])}
    hook = GroupDroLoss(token_groups, GdrtSettings(groups=3, tau=0.5))
    assert hook(["a", "b"], NLL, mask).item() == pytest.approx(
        group_dro_loss(NLL, GROUPS, 0.5).item()
    )
    # the rows named the other way round: each row's tokens would get the other's groups
    with pytest.raises(ValueError, match="do not match the batch's completion tokens"):
        hook(["b", "a"], NLL, mask)
    assert hook.describe() == {
        "name": "gdrt",
        "groups": 3,
        "tau": 0.5,
        "grouping": hook.describe()["grouping"],
    }
    assert "without the history titles" in hook.describe()["grouping"]


def test_token_groups_are_equal_count_quantiles_of_the_gain():
    gains = {
        "a": torch.tensor([0.5, -1.0, 2.0]),
        "b": torch.tensor([0.0, 3.0, 0.1, -2.0]),
        "c": torch.tensor([1.0, 0.2, 0.3]),
    }
    groups = quantile_groups(gains, 4)
    assert {key: value.shape for key, value in groups.items()} == {
        key: value.shape for key, value in gains.items()
    }
    flat_gains, flat_groups = torch.cat(list(gains.values())), torch.cat(list(groups.values()))
    # 10 tokens in 4 groups: ranks r go to group ⌊4r/10⌋
    assert torch.bincount(flat_groups).tolist() == [3, 2, 3, 2]
    for group in range(3):  # every gain of a group is below every gain of the next
        assert flat_gains[flat_groups == group].max() < flat_gains[flat_groups == group + 1].min()
    assert groups["b"].tolist() == [0, 3, 1, 0]  # ranks 2, 9, 3 and 0 of the ten
    assert torch.cat(list(quantile_groups(gains, 1).values())).eq(0).all()
    # equal gains still fill equal groups (split by order, not all in one)
    ties = quantile_groups({"t": torch.zeros(6)}, 3)["t"]
    assert ties.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="cannot cut 10 tokens into 11 groups"):
        quantile_groups(gains, 11)
    with pytest.raises(ValueError, match="tau > 0"):
        GdrtSettings(groups=2, tau=0.0)


def test_settings_are_the_fairest_within_the_accuracy_budget():
    trials = [
        Trial(GdrtSettings(2, 1.0), unfairness=0.30, ndcg=0.100),
        Trial(GdrtSettings(4, 1.0), unfairness=0.10, ndcg=0.080),  # fairer, 20% less accurate
        Trial(GdrtSettings(4, 0.3), unfairness=0.20, ndcg=0.097),
    ]
    assert choose_settings(trials, original_ndcg=0.1, max_ndcg_drop=0.05) == trials[2]
    assert choose_settings(trials, original_ndcg=0.1, max_ndcg_drop=0.25) == trials[1]
    # none within the budget: the most accurate
    assert choose_settings(trials, original_ndcg=0.2, max_ndcg_drop=0.05) == trials[0]


def test_the_history_free_prompt_lists_no_title(tiny_bundle: Path, tmp_path: Path):
    bundle = Bundle.load(tiny_bundle)
    train = bundle.split("train")
    empty = prompt_without_history(bundle, train)
    titles = [item.title for item in bundle.items.values()]
    assert not [title for title in titles if title in empty]
    for sample in train:  # the instruction and the layout are the sample's own
        assert any(bundle.items[item].title in sample.prompt for item in sample.history)
        head, _, tail = sample.prompt.partition("### Input:\n")
        assert empty == head + "### Input:\n" + tail[tail.index("\n") :]
    # a prompt that is not the template's rendering of the history is refused
    changed = tmp_path / "changed"
    shutil.copytree(tiny_bundle, changed)
    rows = (changed / "train.jsonl").read_text().splitlines()
    rows[0] = rows[0].replace("### Input:", "### Watched:")
    (changed / "train.jsonl").write_text("\n".join(rows) + "\n")
    changed_bundle = Bundle.load(changed)
    with pytest.raises(InputError, match="not the template's rendering"):
        prompt_without_history(changed_bundle, changed_bundle.split("train"))


def test_gains_are_the_log_probability_the_history_adds(
    tiny_model: Path, tiny_bundle: Path, tiny_adapter
):
    adapter, _ = tiny_adapter
    bundle = Bundle.load(tiny_bundle)
    config = TrainConfig(max_samples=12)
    gains = history_gains(tiny_model, adapter, bundle, config, device="cpu")
    base, tokenizer = load_base_model(tiny_model)
    model = load_adapter(base, adapter)
    train = {sample.sample_id: sample for sample in bundle.split("train")}
    assert len(gains) == 12
    empty = prompt_without_history(bundle, list(train.values()))
    for sample_id, gain in list(gains.items())[:3]:
        sample = train[sample_id]
        assert len(gain) == len(encode_completion(tokenizer, sample.completion))
        # summed over the completion: the title's log-probability with minus without history
        with torch.no_grad():
            with_history = score_completions(model, tokenizer, sample.prompt, [sample.completion])
            without = score_completions(model, tokenizer, empty, [sample.completion])
        assert gain.sum().item() == pytest.approx((with_history - without).item(), abs=1e-3)
    assert torch.cat(list(gains.values())).abs().max() > 0.01  # the history matters somewhere


def _lora_weights(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter / "adapter_model.safetensors")


def _group_losses(
    model_dir: Path, adapter: Path, bundle: Bundle, groups: dict[str, torch.Tensor], count: int
) -> torch.Tensor:
    """Each token group's mean NLL over the training samples that `groups` covers."""
    base, tokenizer = load_base_model(model_dir)
    model = load_adapter(base, adapter)
    samples = [sample for sample in bundle.split("train") if sample.sample_id in groups]
    sums, counts = torch.zeros(count), torch.zeros(count)
    with torch.no_grad():
        for sample in samples:
            encoded = encode_sample(tokenizer, sample.prompt, sample.completion, 256)
            nll, mask = completion_nll(model, collate([encoded], tokenizer.pad_token_id))
            sums.index_add_(0, groups[sample.sample_id], nll[mask])
            counts.index_add_(0, groups[sample.sample_id], torch.ones(mask.sum().item()))
    return sums / counts


def test_gdrt_training_evens_out_the_token_groups(
    tiny_model: Path, tiny_bundle: Path, tiny_adapter, tmp_path: Path
):
    adapter, _ = tiny_adapter
    bundle = Bundle.load(tiny_bundle)
    config = TrainConfig(epochs=1, learning_rate=3e-2, max_samples=48)
    plain = tmp_path / "plain"
    train_adapter(tiny_model, bundle, plain, config, device="cpu")

    class MeanOfSamples:
        """The default objective written as a token loss: the hook alone changes nothing."""

        def __call__(self, sample_ids, nll, mask):
            return sample_means(nll, mask).mean()

        def describe(self):
            return {"name": "mean of samples"}

    hooked = tmp_path / "hooked"
    train_adapter(tiny_model, bundle, hooked, config, device="cpu", token_loss=MeanOfSamples())
    for name, weight in _lora_weights(hooked).items():
        torch.testing.assert_close(weight, _lora_weights(plain)[name])

    gains = history_gains(tiny_model, adapter, bundle, config, device="cpu")
    settings = GdrtSettings(groups=4, tau=1.0)
    gdrt = tmp_path / "gdrt"
    report = train_gdrt(tiny_model, bundle, gdrt, gains, settings, config, device="cpu")
    assert report.samples == 48 and math.isfinite(report.epoch_losses[0])
    manifest = json.loads((gdrt / TRAIN_MANIFEST).read_text())
    assert manifest["token_loss"]["name"] == "gdrt" and manifest["token_loss"]["tau"] == 1.0
    assert json.loads((plain / TRAIN_MANIFEST).read_text())["token_loss"] is None
    # from the same seeded start and batches, GDRT leaves its worst group better off and
    # the groups' losses closer together than plain training does
    groups = quantile_groups(gains, settings.groups)
    after_plain = _group_losses(tiny_model, plain, bundle, groups, settings.groups)
    after_gdrt = _group_losses(tiny_model, gdrt, bundle, groups, settings.groups)
    assert after_gdrt.max() < after_plain.max(), (after_gdrt, after_plain)
    spread_gdrt, spread_plain = (
        after_gdrt.max() - after_gdrt.min(),
        after_plain.max() - after_plain.min(),
    )
    assert spread_gdrt < 0.8 * spread_plain, (after_gdrt, after_plain)
    with pytest.raises(ValueError, match="cannot be combined"):
        train_adapter(
            tiny_model,
            bundle,
            tmp_path / "both",
            config,
            weights={},
            token_loss=GroupDroLoss.from_gains(gains, settings),
        )


@pytest.mark.slow
def test_the_benchmark_chooses_gdrt_on_validation_and_reruns_it(
    tiny_model: Path, tiny_bundle: Path, tmp_path: Path
):
    grid = (GdrtSettings(groups=2, tau=0.3), GdrtSettings(groups=4, tau=3.0))
    # the quick profile scaled to the tiny model and bundle, the service left out
    profile = replace(
        PROFILES["quick"],
        name="tiny",
        train_size=10_000,
        scaling_sizes=(),
        test_users=None,
        guard_users=12,
        k=1,
        num_beams=2,
        learning_rate=3e-2,
        max_ndcg_drop=0.5,
        gdrt_grid=grid,
        service=False,
    )
    # systems recorded by a run before GDRT existed: it is run again alone
    recorded = tmp_path / "recorded.json"
    others = {name: {"seconds": 1.0} for name in SYSTEMS if name != "gdrt"}
    others["fudlr"]["index_seconds"] = 1.0  # the scaling sweep's largest size reads it
    recorded.write_text(json.dumps({"systems": others, "commit": "earlier"}))
    work = tmp_path / "work"
    bench = SystemsBench(profile, tiny_model, tiny_bundle, work, print)
    with pytest.raises(ValueError, match="lacks gdrt: rerun the benchmark"):
        bench.recorded(recorded)
    results = bench.recorded(recorded, rerun=["gdrt"])

    gdrt = results["systems"]["gdrt"]
    assert list(results["systems_from"]["rerun"]) == ["gdrt"]
    assert results["original_adapter"]["retrained"]  # the fresh work folder had none
    assert [c["settings"] for c in gdrt["candidates"]] == [
        {"groups": 2, "tau": 0.3},
        {"groups": 4, "tau": 3.0},
    ]
    assert gdrt["chosen_by"] == "validation" and gdrt["settings"] in [
        c["settings"] for c in gdrt["candidates"]
    ]
    chosen = choose_settings(
        [
            Trial(GdrtSettings(**c["settings"]), c["unfairness"], c["ndcg"])
            for c in gdrt["candidates"]
        ],
        gdrt["original_valid"]["ndcg"],
        profile.max_ndcg_drop,
    )
    assert gdrt["settings"] == {"groups": chosen.settings.groups, "tau": chosen.settings.tau}
    assert gdrt["seconds"] > gdrt["gains_seconds"] > 0 and gdrt["tuning_seconds"] > 0
    assert gdrt["metrics"]["users"] == results["test_users"]
    assert f"G={chosen.settings.groups}" in gdrt["work"]
    for settings in grid:  # each candidate was trained with its own loss
        name = f"gdrt-g{settings.groups}-tau{settings.tau}"
        loss = json.loads((work / name / TRAIN_MANIFEST).read_text())["token_loss"]
        assert (loss["groups"], loss["tau"]) == (settings.groups, settings.tau)

    # untuned: the defaults, said so
    untuned = SystemsBench(replace(profile, gdrt_grid=()), tiny_model, tiny_bundle, work, print)
    untuned.gdrt(work / "original")
    entry = untuned.systems["gdrt"]
    assert entry["chosen_by"] == "defaults" and entry["settings"] == {"groups": 4, "tau": 1.0}
    assert "candidates" not in entry
