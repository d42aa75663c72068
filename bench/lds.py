"""Fidelity as the field scores it: the linear datamodeling score (LDS) of the influence scores.

LDS (TRAK, Park et al. 2023; kronfluence): draw M random subsets of the training set, each
keeping a fraction α of it; retrain on each with the same recipe, so that only the subset
varies; measure every query at the retrained weights. A score is the predicted change of a
query if its sample were removed, so the scores' linear datamodel predicts a subset's
change as the sum of the scores of the samples it leaves out. LDS of a query is the
Spearman correlation of predicted and retrained changes over the M subsets; the benchmark
reports it per query and averaged.

On the tiny model (the tests' random tiny Llama and tiny synthetic MovieLens), whose
retraining takes seconds, with a debias job's queries: each popularity group's surrogate
share of the next recommendation, the validation loss and each gender's log-likelihood;
next to them each validation user's own loss (the per-example queries the field reports).
Scores from the index as a job builds it: EK-FAC over exact (dense) gradients, the
default eigenbasis projection, and a projection that keeps as small a share of the
coordinates as the default keeps on the reference adapter; and the identity-curvature
baseline (plain gradient dot products), the field's sanity reference.

Removal is retraining with the left-out samples' weights at 0 (as `retrain_without_s`):
every other sample sees the same batches in the same order, which is also what the Newton
step models. With `seeds` > 1 each subset is retrained once per seed and the measured
values averaged (training noise averages out); how well half the seeds' values agree with
the other half's over the subsets says how much of a retrained change the subset alone
determines. The headline is the index's default damping; the damping sweep picks a factor
on the first half of the subsets and scores it on the second half, so that what it finds
is held out.

Writes bench/results/lds-<profile>-<date>-<commit>.json (its per-subset values beside it),
lds-<profile>-latest.json and bench/results/plots/lds-<profile>-latest.png, and prints a
table. `--quick` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from bench.common import RESULTS, ROOT, commit, machine
from fudlr.data.bundle import Bundle
from fudlr.data.schema import SampleRow
from fudlr.fairness.groups import Groups, item_groups, user_groups
from fudlr.fairness.surrogates import (
    Pool,
    Quantities,
    item_share_quantities,
    loss_quantities,
    mean_item_shares,
    sample_pools,
)
from fudlr.influence.curvature import Curvature
from fudlr.influence.gradients import dot_with_queries
from fudlr.influence.index import (
    IndexConfig,
    TrainingIndex,
    adapter_weights_digest,
    build_index,
    samples_digest,
    training_samples,
)
from fudlr.influence.layout import ParameterLayout
from fudlr.influence.projection import DEFAULT_PROJECTION_DIM, Projection
from fudlr.influence.scores import influence_scores
from fudlr.influence.tracker import lora_linears
from fudlr.models.lora import load_adapter
from fudlr.models.store import load_base_model, model_digest
from fudlr.recommender.encoding import encode_sample, length_sorted_batches, per_sample_loss
from fudlr.recommender.train import TrainConfig, train_adapter

console = Console()
Log = Callable[[str], None]
ITEM_ATTRIBUTE, USER_ATTRIBUTE = "popularity_group", "gender"
USER_LOSS = "valid:loss:"  # prefix of each validation user's own loss
TARGET = 0.3
# LoRA weights of the reference adapter (bench/results/engine-index-full-latest.json): the
# default projection keeps DEFAULT_PROJECTION_DIM of them, a share the tiny adapter's far
# smaller LoRA never reaches with the default itself
REFERENCE_LORA_WEIGHTS = 153_600


@dataclass(frozen=True)
class LdsProfile:
    """Sizes of one LDS run.

    subsets: M, the retrained training subsets; fraction: α, the share of the training set
    each keeps; seeds: retrainings per subset, their measured values averaged.
    users, items: the tiny MovieLens (history length 5): training windows and validation
    users (the per-user queries) grow with users.
    epochs, learning_rate, batch_size: the recipe of every training run (the tests' tiny
    recipe: a random tiny model learns slowly, hence the high rate).
    damping_factors: of the EK-FAC damping sweep, the index's default among them.
    temperature: of the share surrogate; its pools hold the whole catalog.
    estimate: how long the profile takes on the 2-core reference machine (said up front).
    """

    name: str
    subsets: int
    seeds: int
    estimate: str
    fraction: float = 0.5
    users: int = 12
    items: int = 30
    epochs: int = 3
    learning_rate: float = 3e-2
    batch_size: int = 8
    damping_factors: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
    temperature: float = 1.0
    seed: int = 0

    @property
    def recipe(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            seed=self.seed,
        )


PROFILES = {
    "quick": LdsProfile(name="quick", subsets=4, seeds=1, estimate="minutes on 2 CPU cores"),
    "full": LdsProfile(
        name="full", subsets=64, seeds=4, estimate="about half an hour on 2 shared CPU cores"
    ),
}


# --- the score --------------------------------------------------------------------------


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-d tensor, tied values sharing their mean rank (Spearman's)."""
    order = torch.argsort(values)
    plain = torch.empty(len(values), dtype=torch.float64)
    plain[order] = torch.arange(len(values), dtype=torch.float64)
    _, tie, counts = torch.unique(values, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, tie, plain)
    return (sums / counts)[tie]


def spearman(first: torch.Tensor, second: torch.Tensor) -> float | None:
    """Spearman's rank correlation; None where it is undefined (under 3 values, a constant)."""
    if len(first) < 3:
        return None
    stacked = torch.stack([ranks(first), ranks(second)])
    if bool((stacked.std(dim=1) == 0).any()):
        return None
    return float(torch.corrcoef(stacked)[0, 1])


def lds(predicted: torch.Tensor, actual: torch.Tensor) -> list[float | None]:
    """Per query (column), the Spearman correlation over subsets (rows) of [M, k] tensors."""
    return [spearman(predicted[:, q], actual[:, q]) for q in range(predicted.size(1))]


def mean(values: Sequence[float | None]) -> float | None:
    """The mean of the defined values (None if none is)."""
    defined = [value for value in values if value is not None]
    return sum(defined) / len(defined) if defined else None


def random_subsets(samples: int, count: int, fraction: float, seed: int) -> torch.Tensor:
    """[count, samples] booleans: each row keeps round(fraction × samples) samples at random."""
    generator = torch.Generator().manual_seed(seed)
    kept = torch.zeros(count, samples, dtype=torch.bool)
    size = round(fraction * samples)
    for row in range(count):
        kept[row, torch.randperm(samples, generator=generator)[:size]] = True
    return kept


# --- the tiny model and its queries -----------------------------------------------------


def prepare_tiny(work: Path, users: int, items: int) -> tuple[Path, Bundle]:
    """The tests' tiny MovieLens (history length 5) and a tiny random Llama whose tokenizer
    learnt its titles; both are seeded, so every run builds the same ones."""
    from fudlr.data.builder import build_movielens_bundle
    from fudlr.data.tiny import make_tiny_movielens
    from fudlr.models.tiny import build_tiny_model

    shutil.rmtree(work, ignore_errors=True)
    source = make_tiny_movielens(users=users, items=items).write(work / "source")
    build_movielens_bundle(source, work / "bundle", history_len=5)
    bundle = Bundle.load(work / "bundle")
    build_tiny_model(work / "model", corpus=[item.title for item in bundle.items.values()])
    return work / "model", bundle


@dataclass
class Probe:
    """The queries, measured alike at every adapter: the same users, pools and temperature."""

    rows: list[SampleRow]
    pools: list[Pool]
    popularity: Groups
    genders: Groups
    completions: dict[str, str]
    temperature: float

    @classmethod
    def of(cls, bundle: Bundle, temperature: float, seed: int) -> Probe:
        """Every validation user; each pool holds the whole catalog, so a share is the exact
        expected group distribution of the next title at `temperature`."""
        rows = bundle.split("valid")
        popularity = item_groups(bundle.items, ITEM_ATTRIBUTE)
        pools = sample_pools(rows, popularity, len(bundle.items), seed)
        genders = user_groups(bundle.users, USER_ATTRIBUTE)
        return cls(rows, pools, popularity, genders, bundle.item_completions(), temperature)

    def user_losses(self, model: torch.nn.Module, tokenizer) -> torch.Tensor:
        """Each validation user's loss on its true next item, [U]."""
        encoded = [encode_sample(tokenizer, r.prompt, r.completion, 256) for r in self.rows]
        losses = torch.zeros(len(encoded), dtype=torch.float64)
        device = next(model.parameters()).device
        with torch.no_grad():
            for indices, batch in length_sorted_batches(encoded, 8, tokenizer.pad_token_id):
                losses[indices] = per_sample_loss(model, batch.to(device)).double().cpu()
        return losses

    def loss_values(self, losses: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """The job's loss quantities from the users' losses, named as `loss_quantities` names
        them: the mean loss, then each gender's mean log-likelihood."""
        names, values = ["accuracy:loss"], [losses.mean()]
        for name in self.genders.names:
            members = [i for i, row in enumerate(self.rows) if name in self.genders.of(row.user_id)]
            if members:
                names.append(f"user:{USER_ATTRIBUTE}:loglik:{name}")
                values.append(-losses[members].mean())
        return names, torch.stack(values)

    def measure(self, model: torch.nn.Module, tokenizer) -> tuple[list[str], torch.Tensor]:
        """Every query's name and value at the loaded adapter."""
        shares = mean_item_shares(
            model, tokenizer, self.rows, self.pools, self.completions, self.temperature
        )
        share_names = [f"{ITEM_ATTRIBUTE}:share:{name}" for name in self.popularity.names]
        losses = self.user_losses(model, tokenizer)
        loss_names, loss_values = self.loss_values(losses)
        user_names = [f"{USER_LOSS}{row.user_id}" for row in self.rows]
        return [*share_names, *loss_names, *user_names], torch.cat([shares, loss_values, losses])

    def gradients(self, model: torch.nn.Module, tokenizer) -> Quantities:
        """Every query's gradient as a job computes it (`item_share_quantities`,
        `loss_quantities`), and each validation user's own loss gradient."""
        linears = lora_linears(model)
        layout = ParameterLayout.of(linears)
        shares = item_share_quantities(
            model,
            tokenizer,
            linears,
            layout,
            self.rows,
            self.pools,
            self.popularity,
            self.completions,
            temperature=self.temperature,
            label=ITEM_ATTRIBUTE,
        )
        losses = loss_quantities(model, tokenizer, linears, layout, self.rows, [self.genders])
        own = losses.per_user[:, 0].double()  # the accuracy column: each user's ∇ℓ_u
        users = Quantities(
            [f"{USER_LOSS}{row.user_id}" for row in self.rows],
            self.user_losses(model, tokenizer),
            own,
        )
        return Quantities.concat(
            [
                Quantities(shares.names, shares.values, shares.gradients),
                Quantities(losses.names, losses.values, losses.gradients),
                users,
            ]
        )


def measure_adapter(model_dir: Path, adapter: Path, probe: Probe) -> torch.Tensor:
    base, tokenizer = load_base_model(model_dir)
    return probe.measure(load_adapter(base, adapter), tokenizer)[1]


# --- the scores -------------------------------------------------------------------------


def loaded_index(model_dir: Path, adapter: Path, bundle: Bundle, root: Path) -> TrainingIndex:
    return TrainingIndex.load(
        root,
        base_model_digest=model_digest(model_dir),
        adapter_digest=adapter_weights_digest(adapter),
        train_digest=samples_digest(training_samples(bundle, adapter)),
    )


def damped(curvature: Curvature, factor: float) -> Curvature:
    """The same curvature at another damping factor (λ = factor × mean eigenvalue per layer)."""
    scale = factor / curvature.damping_factor
    layers = {
        name: replace(layer, damping=layer.damping * scale)
        for name, layer in curvature.layers.items()
    }
    return replace(curvature, layers=layers, damping_factor=factor)


def index_scores(index: TrainingIndex, gradients: torch.Tensor) -> torch.Tensor:
    """[n, k]: each query's predicted change if each training sample were removed."""
    preconditioned = index.precondition(gradients)
    return influence_scores(index.cache.read(), preconditioned, index.samples, index.samples)


def identity_scores(dense: TrainingIndex, gradients: torch.Tensor) -> torch.Tensor:
    """[n, k]: the same without curvature, (1/n) ∇q · ∇ℓ_i (the field's baseline)."""
    queries = gradients.float().T.contiguous()
    return dot_with_queries(dense.cache.read(), queries, dense.samples) / dense.samples


@dataclass
class Method:
    """One way of scoring: the predicted change of every query on removing each sample."""

    label: str  # a table column's
    description: str
    scores: torch.Tensor  # [n, k]
    index: dict[str, Any]


def index_summary(index: TrainingIndex) -> dict[str, Any]:
    """What the index a method scored with kept: its projection and damping."""
    manifest = index.manifest
    return {
        "lora_weights": manifest["dim"],
        "projection": manifest["projection"],
        "damping_factor": manifest["config"]["damping_factor"],
        "curvature_samples": index.curvature.samples,
    }


def score_methods(
    model_dir: Path,
    adapter: Path,
    bundle: Bundle,
    work: Path,
    gradients: torch.Tensor,
    damping_factors: Sequence[float],
) -> tuple[dict[str, Method], dict[float, torch.Tensor]]:
    """The scores of every method from indexes built as a job builds them, and those of
    EK-FAC over dense gradients at each damping factor of the sweep."""

    def built(name: str, config: IndexConfig) -> TrainingIndex:
        build_index(model_dir, adapter, bundle, work / name, config, "cpu")
        return loaded_index(model_dir, adapter, bundle, work / name)

    dense = built("dense", IndexConfig(projection=Projection.DENSE))
    projected = built("eigenbasis", IndexConfig())
    share = DEFAULT_PROJECTION_DIM / REFERENCE_LORA_WEIGHTS
    small = built("eigenbasis-small", IndexConfig(projection_dim=round(share * dense.layout.dim)))
    methods = {
        "ekfac_dense": Method(
            "dense",
            "EK-FAC over dense gradients",
            index_scores(dense, gradients),
            index_summary(dense),
        ),
        "ekfac_eigenbasis": Method(
            str(projected.cache.dim),
            f"EK-FAC, the default eigenbasis cache (up to {DEFAULT_PROJECTION_DIM} coordinates)",
            index_scores(projected, gradients),
            index_summary(projected),
        ),
        "ekfac_eigenbasis_small": Method(
            str(small.cache.dim),
            f"EK-FAC, an eigenbasis cache of {share:.1%} of the coordinates (the share the "
            "default keeps on the reference adapter)",
            index_scores(small, gradients),
            index_summary(small),
        ),
        "identity": Method(
            "identity",
            "identity curvature: plain gradient dot products (the field's baseline)",
            identity_scores(dense, gradients),
            {"lora_weights": dense.layout.dim, "projection": {"kind": "dense"}},
        ),
    }
    sweep = {
        factor: index_scores(replace(dense, curvature=damped(dense.curvature, factor)), gradients)
        for factor in damping_factors
    }
    return methods, sweep


# --- the run ----------------------------------------------------------------------------


def retrain_and_measure(
    profile: LdsProfile,
    model_dir: Path,
    bundle: Bundle,
    kept: torch.Tensor,
    probe: Probe,
    work: Path,
    log: Log,
) -> torch.Tensor:
    """[M, seeds, k]: every query measured after retraining on each subset with each seed."""
    samples = bundle.split("train")
    measured, started = [], time.perf_counter()
    for subset, row in enumerate(kept, start=1):
        left_out = {samples[i].sample_id: 0.0 for i in (~row).nonzero().flatten().tolist()}
        per_seed = []
        for seed in range(profile.seeds):
            recipe = replace(profile.recipe, seed=profile.seed + seed)
            train_adapter(
                model_dir, bundle, work / "retrained", recipe, weights=left_out, device="cpu"
            )
            per_seed.append(measure_adapter(model_dir, work / "retrained", probe))
        measured.append(torch.stack(per_seed))
        left = (time.perf_counter() - started) / subset * (len(kept) - subset)
        log(f"subset {subset}/{len(kept)} retrained ({left / 60:.1f} min left)")
    return torch.stack(measured)


def summary(names: list[str], predicted: torch.Tensor, actual: torch.Tensor) -> dict[str, Any]:
    """LDS per query, and its means: over the job's quantities (the target's), over the
    validation users' own losses."""
    per_query = dict(zip(names, lds(predicted, actual), strict=True))
    job = [value for name, value in per_query.items() if not name.startswith(USER_LOSS)]
    users = [value for name, value in per_query.items() if name.startswith(USER_LOSS)]
    return {"mean": mean(job), "user_loss_mean": mean(users), "lds": per_query}


def means(names: list[str], predicted: torch.Tensor, actual: torch.Tensor) -> dict[str, Any]:
    """`summary` without the per-query scores."""
    return {k: v for k, v in summary(names, predicted, actual).items() if k != "lds"}


def damping_sweep(
    names: list[str],
    removed: torch.Tensor,
    actual: torch.Tensor,
    sweep: dict[float, torch.Tensor],
) -> dict[str, Any]:
    """EK-FAC over dense gradients at each damping factor: LDS on all subsets and on each
    half; the factor the first half scores best, whose second-half LDS is then held out."""
    half = len(actual) // 2
    factors = {}
    for factor, scores in sweep.items():
        predicted = removed @ scores
        factors[str(factor)] = {
            **means(names, predicted, actual),
            "first_half": means(names, predicted[:half], actual[:half]),
            "second_half": means(names, predicted[half:], actual[half:]),
        }
    scored = [
        factor for factor, entry in factors.items() if entry["first_half"]["mean"] is not None
    ]
    return {
        "note": "chosen on the first half of the subsets (mean over the job's quantities); "
        "its second half is held out",
        "default": str(IndexConfig().damping_factor),
        "chosen_on_first_half": max(
            scored, key=lambda factor: factors[factor]["first_half"]["mean"], default=None
        ),
        "factors": factors,
    }


def run(profile: LdsProfile, work: Path, log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    """The results (without the run's header), and the values behind them: per query, at the
    full adapter and after each retraining, and each method's predictions."""
    clock = {"started": time.perf_counter()}
    model_dir, bundle = prepare_tiny(work, profile.users, profile.items)
    full = work / "full"
    log("training the full-data adapter")
    train_adapter(model_dir, bundle, full, profile.recipe, device="cpu")
    probe = Probe.of(bundle, profile.temperature, profile.seed)
    base, tokenizer = load_base_model(model_dir)
    model = load_adapter(base, full, trainable=True)
    queries = probe.gradients(model, tokenizer)
    names, before = probe.measure(model, tokenizer)
    if names != queries.names:
        raise RuntimeError(f"queries measured and differentiated differ: {names} {queries.names}")
    log(f"{len(names)} queries; building the indexes")
    methods, sweep = score_methods(
        model_dir, full, bundle, work / "indexes", queries.gradients, profile.damping_factors
    )
    clock["scored"] = time.perf_counter()
    samples = len(bundle.split("train"))
    kept = random_subsets(samples, profile.subsets, profile.fraction, profile.seed)
    log(f"retraining {profile.subsets} subsets x {profile.seeds} seeds")
    measured = retrain_and_measure(profile, model_dir, bundle, kept, probe, work, log)
    clock["retrained"] = time.perf_counter()
    actual = measured.mean(dim=1) - before
    first_seed = measured[:, 0] - before
    removed = (~kept).double()
    predicted = {name: removed @ method.scores for name, method in methods.items()}
    results: dict[str, Any] = {
        "settings": asdict(profile),
        "recipe": asdict(profile.recipe),
        "training_samples": samples,
        "validation_users": len(probe.rows),
        "subsets": profile.subsets,
        "seeds": profile.seeds,
        "retrainings": profile.subsets * profile.seeds,
        "queries": len(names),
        "methods": {
            name: {
                "label": method.label,
                "description": method.description,
                "index": method.index,
                **summary(names, predicted[name], actual),
                "first_seed_only": means(names, predicted[name], first_seed),
            }
            for name, method in methods.items()
        },
        "damping_sweep": damping_sweep(names, removed, actual, sweep),
        "seconds": {
            "setup_and_indexes": clock["scored"] - clock["started"],
            "retraining": clock["retrained"] - clock["scored"],
            "per_retraining": (clock["retrained"] - clock["scored"]) / measured[:, :, 0].numel(),
            "total": time.perf_counter() - clock["started"],
        },
    }
    if profile.seeds > 1:  # the training noise: one half of the seeds against the other
        half = profile.seeds // 2
        results["seed_agreement"] = {
            "note": f"Spearman over the subsets between the values averaged over seeds "
            f"0-{half - 1} and over seeds {half}-{profile.seeds - 1}: how much of a retrained "
            "change the subset alone determines",
            **summary(names, measured[:, :half].mean(dim=1), measured[:, half:].mean(dim=1)),
        }
    ekfac = results["methods"]["ekfac_dense"]["mean"]
    results["target"] = {
        "lds": TARGET,
        "of": "ekfac_dense: mean over the job's quantities",
        "met": ekfac is not None and ekfac >= TARGET,
    }
    values = {
        "names": names,
        "full_adapter": before.tolist(),
        "retrained": measured.tolist(),  # [subset][seed][query]
        "left_out": [row.nonzero().flatten().tolist() for row in ~kept],
        "predicted": {name: changes.tolist() for name, changes in predicted.items()},
    }
    return results, values


# --- the report -------------------------------------------------------------------------


def plot(results: dict[str, Any], values: dict[str, Any], path: Path) -> Path:
    """Predicted against retrained changes over the subsets for a few queries (EK-FAC over
    dense gradients): the first and last popularity group's share, the validation loss
    and the first validation user's loss."""
    names: list[str] = values["names"]
    shares = [i for i, name in enumerate(names) if name.startswith(f"{ITEM_ATTRIBUTE}:share:")]
    user = next(i for i, name in enumerate(names) if name.startswith(USER_LOSS))
    actual = torch.tensor(values["retrained"]).mean(dim=1) - torch.tensor(values["full_adapter"])
    predicted = torch.tensor(values["predicted"]["ekfac_dense"])
    ekfac, identity = (results["methods"][name]["lds"] for name in ("ekfac_dense", "identity"))
    figure = Figure(figsize=(10.0, 8.0))
    FigureCanvasAgg(figure)
    for panel, column in enumerate(
        (shares[0], shares[-1], names.index("accuracy:loss"), user), start=1
    ):
        axes = figure.add_subplot(2, 2, panel)
        axes.scatter(predicted[:, column], actual[:, column], s=14)
        name = names[column]
        axes.set_title(
            f"{name}\nLDS {_number(ekfac[name])} (identity {_number(identity[name])})", fontsize=9
        )
        axes.set_xlabel("predicted change (EK-FAC, dense)")
        axes.set_ylabel(f"retrained change (mean of {results['seeds']} seed(s))")
    figure.suptitle(
        f"LDS on the tiny model: {results['subsets']} subsets at α = "
        f"{results['settings']['fraction']}, {results['training_samples']} training samples"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(results: dict[str, Any]) -> Table:
    """LDS per job quantity and method (columns: the EK-FAC caches, identity), the users'
    losses as one row (their mean), and the seeds' agreement with each other."""
    methods = results["methods"]
    agreement = results.get("seed_agreement")
    table = Table(
        title=f"LDS, tiny model: {results['subsets']} subsets x {results['seeds']} seed(s), "
        f"{results['training_samples']} training samples"
    )
    table.add_column("query", no_wrap=True)
    for method in methods.values():
        table.add_column(method["label"], justify="right")
    if agreement:
        table.add_column("seeds", justify="right")
    names = [n for n in results["methods"]["ekfac_dense"]["lds"] if not n.startswith(USER_LOSS)]
    rows = [(name, lambda entry, name=name: entry["lds"][name]) for name in names]
    rows += [
        (f"users' own losses ({results['validation_users']})", lambda e: e["user_loss_mean"]),
        ("mean, job's quantities", lambda entry: entry["mean"]),
    ]
    for label, cell in rows:
        cells = [_number(cell(method)) for method in methods.values()]
        table.add_row(label, *cells, *([_number(cell(agreement))] if agreement else []))
    return table


def write_results(results: dict[str, Any], values: dict[str, Any], folder: Path) -> Path:
    """<folder>/lds-<profile>-<date>-<commit>.json with its values beside it (-values.json,
    compact), lds-<profile>-latest.json, and the plot in <folder>/plots/."""
    stem = f"lds-{results['profile']}"
    folder.mkdir(parents=True, exist_ok=True)
    dated = f"{stem}-{results['date']}-{results['commit']}"
    results = {**results, "values_file": f"{dated}-values.json"}
    (folder / results["values_file"]).write_text(json.dumps(values) + "\n")
    text = json.dumps(results, indent=2) + "\n"
    (folder / f"{dated}.json").write_text(text)
    (folder / f"{stem}-latest.json").write_text(text)
    plot(results, values, folder / "plots" / f"{stem}-latest.png")
    return folder / f"{dated}.json"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke profile (a few subsets)")
    parser.add_argument("--work", type=Path, default=ROOT / ".fudlr-bench" / "lds")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write")
    args = parser.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    console.rule(f"LDS benchmark ({profile.name} profile: {profile.estimate})")
    header = {
        "benchmark": "lds",
        "profile": profile.name,
        "date": date.today().isoformat(),
        "commit": commit(),
        "machine": machine(),
        "precision": "fp32",
    }
    load = os.getloadavg()[0]
    measured, values = run(profile, args.work / profile.name, console.print)
    # the machine is often shared: the 1-minute load average says how much
    results = {**header, "load_average": {"start": load, "end": os.getloadavg()[0]}, **measured}
    path = write_results(results, values, args.results)
    console.print(table(results))
    sweep = results["damping_sweep"]
    chosen, default = sweep["chosen_on_first_half"], sweep["default"]
    if chosen is not None:
        held_out = {f: sweep["factors"][f]["second_half"]["mean"] for f in (chosen, default)}
        console.print(
            f"damping factor chosen on the first half of the subsets: {chosen}; LDS on the "
            f"second half {_number(held_out[chosen])} (default {default}: "
            f"{_number(held_out[default])})"
        )
    seconds = results["seconds"]
    console.print(
        f"target: mean LDS >= {TARGET} (EK-FAC, dense): "
        f"{'met' if results['target']['met'] else 'not met'}; "
        f"{seconds['total'] / 60:.1f} min ({seconds['per_retraining']:.1f} s per retraining)"
        f"\nwrote {path}"
    )


if __name__ == "__main__":
    main()
