"""Issue 5's systems, all from one base model, bundle and recipe, measured on one test subset.

`SystemsBench.run()` trains the original recommender and then each competitor in turn —
IFairLRS reweighting (retrain), IFairLRS reranking (no training), GDRT (retrain with a
token-level group-DRO loss), FUDLR (index + job),
retraining without FUDLR's selection, the same Newton step on random samples, FUDLR on
two biases — measuring every one on the same test users with the same decoding, and
timing each system's own work. Then the scaling sweep (index and job time against n)
and, optionally, the same job through the HTTP service. A most-popular reference (no
model) is measured on the same test users to give the systems' numbers a scale.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import commit, machine, run_of
from fudlr.baselines.gdrt import (
    GROUPING,
    GdrtSettings,
    Trial,
    choose_settings,
    history_gains,
    train_gdrt,
)
from fudlr.baselines.popularity import interaction_counts, most_popular
from fudlr.baselines.rerank import ALPHAS, Candidate, choose_alpha, distance_scale, group_bias
from fudlr.baselines.reweight import ifairlrs_weights
from fudlr.data.bundle import Bundle, subset
from fudlr.fairness.bootstrap import paired_changes, paired_difference
from fudlr.fairness.groups import item_groups
from fudlr.fairness.metrics import evaluate, ndcg_at_k
from fudlr.influence.index import IndexConfig, build_index, training_samples
from fudlr.models.store import weights_digest
from fudlr.recommender.recommend import Decoding, Ranked, RecommendConfig, Recommender
from fudlr.recommender.train import TrainConfig, train_adapter
from fudlr.repair.config import DebiasConfig
from fudlr.repair.pipeline import DebiasJob, RepairRejected
from fudlr.repair.spec import BiasSpec

if TYPE_CHECKING:
    import torch

SYSTEMS = (
    "original",
    "ifairlrs_rw",
    "ifairlrs_rr",
    "gdrt",
    "retrain_without_s",
    "random_removal",
    "fudlr",
    "fudlr_multi",
)
# run again alone from recorded systems: they need only the original adapter (and the index)
RERUNNABLE = ("fudlr_multi", "gdrt")
ITEM_ATTRIBUTE, GENRES, USER_ATTRIBUTE = "popularity_group", "genres", "gender"


@dataclass(frozen=True)
class BenchProfile:
    """Sizes and settings of one benchmark run.

    train_size: training windows of the bundle (every system's training set).
    scaling_sizes: training-set sizes at which retraining, index and job are timed; sizes
    below train_size train their own adapter on a fixed-seed subset.
    test_users: test users every system is measured on (None = all).
    guard_users: validation users of FUDLR's guard and of the reranking's α tuning.
    query_users: validation users behind FUDLR's queries.
    curvature_samples: training samples behind the index's curvature factors.
    k: the K of the targets (MGU@K, NDCG@K); ks: every K reported.
    num_beams, precision: decoding and arithmetic, the same for every system.
    epochs, learning_rate, history_len: the training recipe and prompt length.
    max_ndcg_drop: the accuracy budget of FUDLR's guard and of the reranking's α and GDRT's
    settings.
    gdrt_grid: GDRT's (G, τ) candidates, each trained and measured on the guard's users,
    the choice recorded; empty: GdrtSettings' defaults, not tuned (a grid costs a
    fine-tuning run per candidate).
    service: also run FUDLR's job through the HTTP service (register, index, submit).
    estimate: how long the profile takes on the 2-core reference machine (said up front).
    """

    name: str
    train_size: int
    scaling_sizes: tuple[int, ...]
    test_users: int | None
    guard_users: int
    query_users: int
    curvature_samples: int
    estimate: str
    k: int = 5
    ks: tuple[int, ...] = (1, 5, 10)
    num_beams: int = 5
    precision: str = "fp32"
    epochs: int = 1
    learning_rate: float = 3e-3
    history_len: int = 5
    max_ndcg_drop: float = 0.05
    gdrt_grid: tuple[GdrtSettings, ...] = ()
    service: bool = True
    seed: int = 0


PROFILES = {
    "quick": BenchProfile(
        name="quick",
        train_size=256,
        scaling_sizes=(64, 128, 256),
        test_users=100,
        guard_users=64,
        query_users=32,
        curvature_samples=128,
        estimate="about 30 minutes on 2 CPU cores with native bf16",
    ),
    "full": BenchProfile(
        name="full",
        train_size=1500,
        scaling_sizes=(375, 750, 1500),
        test_users=500,
        guard_users=256,
        query_users=64,
        curvature_samples=256,
        estimate="about 3.5 hours on 2 CPU cores with native bf16 (the systems alone, "
        "--no-scaling --no-service: 2 hours; far longer in fp32)",
    ),
}

Log = Callable[[str], None]


def item_bias_label(k: int) -> str:
    """The popularity bias every FUDLR job of the benchmark targets."""
    return f"item:{ITEM_ATTRIBUTE}:MGU@{k}"


def _clock() -> float:
    return time.perf_counter()


class SystemsBench:
    """One run of every system; `run()` returns the results JSON (without plots)."""

    def __init__(
        self, profile: BenchProfile, model_dir: Path, bundle_dir: Path, work: Path, log: Log
    ) -> None:
        self.profile, self.model_dir, self.work, self.log = profile, model_dir, work, log
        self.bundle = Bundle.load(bundle_dir)
        self.recipe = TrainConfig(
            epochs=profile.epochs, learning_rate=profile.learning_rate, precision=profile.precision
        )
        # the grounded protocol of the published runs (IFairLRS reranking moves grounding
        # distances); the benchmark moves to constrained decoding with the reference recommender
        self.decoding = RecommendConfig(
            decoding=Decoding.GROUNDED,
            num_beams=profile.num_beams,
            exclude_history=False,
            precision=profile.precision,
        )
        self.test_rows = subset(self.bundle.split("test"), profile.test_users, profile.seed + 2)
        # the guard's users (DebiasConfig.seed + 1): the reranking is tuned on the same ones
        self.valid_rows = subset(self.bundle.split("valid"), profile.guard_users, profile.seed + 1)
        self.popularity = item_groups(self.bundle.items, ITEM_ATTRIBUTE)
        self.systems: dict[str, dict[str, Any]] = {}

    @property
    def partial(self) -> Path:
        return self.work / "systems.partial.json"

    def record(self, name: str, entry: dict[str, Any]) -> None:
        """Keep a system's results, and on disk at once: a late failure loses no system."""
        self.systems[name] = entry
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.partial.write_text(json.dumps(self.systems, indent=2) + "\n")

    def recorded(self, source: Path, rerun: Sequence[str] = ()) -> dict[str, Any]:
        """What `run()` returns, with the systems another run recorded instead of running
        them: its `systems.partial.json` (a run stopped after its systems) or its results
        JSON (a run with --no-scaling --no-service, perhaps on another day: commit it, then
        run the rest from the same commit). The systems in `rerun` (those of `RERUNNABLE`,
        which need only the original adapter and the index) are run by this run instead.
        The sweep still runs; its largest size is the recorded FUDLR job. `systems_from`
        names the run that measured the systems (and those this one ran again), and that
        file's `corrections` carry over."""
        if not source.is_file():
            raise FileNotFoundError(f"no recorded systems at {source}")
        unknown = sorted(set(rerun) - set(RERUNNABLE))
        if unknown:
            raise ValueError(
                f"cannot run {', '.join(unknown)} alone: only {', '.join(RERUNNABLE)} can be"
            )
        recorded = json.loads(source.read_text())
        self.systems = recorded.get("systems", recorded)
        missing = [name for name in SYSTEMS if name not in self.systems and name not in rerun]
        if missing:
            raise ValueError(
                f"{source} lacks {', '.join(missing)}: rerun the benchmark "
                f"(or --rerun those of {', '.join(RERUNNABLE)})"
            )
        # a file itself written from recorded systems names the run that measured them
        origin = recorded.get("systems_from", recorded)
        provenance: dict[str, Any] = {
            "systems_from": {
                "file": str(source),
                **run_of(origin),
            }
        }
        if "corrections" in recorded:  # what was measured again after that run still holds
            provenance["corrections"] = recorded["corrections"]
        if rerun or self.profile.service:
            provenance["original_adapter"] = self.original_adapter()
        # systems run again, here or by an earlier run from recorded systems: by which run
        reruns = dict(origin.get("rerun", {}))
        this_run = {"commit": commit(), "date": date.today().isoformat(), "machine": machine()}
        reruns.update({name: this_run for name in rerun})
        if reruns:
            provenance["systems_from"]["rerun"] = reruns
        if "fudlr_multi" in rerun:
            self.fudlr_multi(self.work / "original", *self.built_index())
        if "gdrt" in rerun:
            self.gdrt(self.work / "original")
        return {**self.summary(self.scaling(self.systems["fudlr"]["index_seconds"])), **provenance}

    def built_index(self) -> tuple[Path, float]:
        """The original adapter's index for systems run again, built (and timed) here; a
        rerun on a fresh machine has none."""
        index = self.work / "index"
        shutil.rmtree(index, ignore_errors=True)  # an index of this run, timed by it
        return index, self.index(self.work / "original", index)

    def original_adapter(self) -> dict[str, Any]:
        """The original adapter in the work folder for the service run or a rerun: retrained
        where a run that only took recorded systems lacks it (the recipe is seeded), and
        compared with the digest the systems' run recorded."""
        adapter = self.work / "original"
        if (adapter / "adapter_model.safetensors").is_file():
            return {"retrained": False}
        self.log("original adapter missing: training it again (the seeded recipe)")
        self.train("original")
        recorded = self.systems["original"].get("adapter_digest")
        return {"retrained": True, "same_adapter": recorded == weights_digest(adapter)}

    # --- measuring -------------------------------------------------------------------------

    def metrics(self, rankings: dict[str, list[str]]) -> dict[str, Any]:
        """Test metrics by popularity groups (with the gender gap) and by genres."""
        ks, rows = self.profile.ks, self.test_rows
        return {
            "metrics": evaluate(
                self.bundle, "test", rankings, ks, ITEM_ATTRIBUTE, USER_ATTRIBUTE, rows=rows
            ),
            "metrics_genres": evaluate(
                self.bundle, "test", rankings, ks, GENRES, USER_ATTRIBUTE, rows=rows
            ),
        }

    def scored(self, ranked: Ranked) -> dict[str, Any]:
        """A system's measured fields from its rankings of the test users, with each user's
        top list (what its changes against the original are bootstrapped from)."""
        rankings = ranked.by_user(self.test_rows)
        return {
            **self.metrics(rankings),
            "exact_titles": ranked.exact_matches,
            "lists": self.top_lists(rankings),
        }

    def top_lists(self, rankings: dict[str, list[str]]) -> dict[str, list[str]]:
        """Each test user's first max(ks) items: all any reported metric reads."""
        return {user: items[: max(self.profile.ks)] for user, items in rankings.items()}

    def changes(self) -> dict[str, Any]:
        """Every system's change against the original on the test users, each with its
        95% paired bootstrap interval and p (the share of resamples in which it is not
        above zero): NDCG at the largest K (a mean over users) and MGU of the popularity
        groups at every K (a number of the whole set of users, measured on each resample
        under both systems). Systems without lists (skipped, or recorded by an older run)
        have none."""
        original = self.systems["original"].get("lists")
        if original is None:
            return {}
        ks, rows, accuracy_k = self.profile.ks, self.test_rows, max(self.profile.ks)

        def gains(lists: dict[str, list[str]]) -> list[float]:
            return [ndcg_at_k(lists[row.user_id], row.target, accuracy_k) for row in rows]

        def unfairness(lists: dict[str, list[str]]) -> Callable[[list], dict[str, float]]:
            def measured(sample: list) -> dict[str, float]:
                report = evaluate(self.bundle, "test", lists, ks, ITEM_ATTRIBUTE, rows=sample)
                return {f"MGU@{k}": report["k"][str(k)]["MGU"] for k in ks}

            return measured

        original_gains, changes = gains(original), {}
        for name, system in self.systems.items():
            lists = system.get("lists")
            if name == "original" or lists is None:
                continue
            self.log(f"{name}: paired bootstrap of its changes against the original")
            unfair = paired_changes(rows, unfairness(original), unfairness(lists), resamples=500)
            changes[name] = {
                f"NDCG@{accuracy_k}": paired_difference(original_gains, gains(lists)).describe(),
                **{metric: change.describe() for metric, change in unfair.items()},
            }
        return changes

    def measure(self, recommender: Recommender, label: str) -> dict[str, Any]:
        self.log(f"{label}: recommending for {len(self.test_rows)} test users")
        return self.scored(recommender.rank(self.test_rows, self.decoding))

    def measure_adapter(self, adapter: Path, label: str) -> dict[str, Any]:
        recommender = Recommender.load(self.model_dir, adapter, self.bundle)
        return self.measure(recommender, label)

    def valid_report(self, ranked: Ranked) -> dict[str, Any]:
        """Metrics at the profile's K on the guard's validation users: what the baselines'
        settings (the reranking's α, GDRT's G and τ) are chosen by."""
        k = self.profile.k
        return evaluate(
            self.bundle,
            "valid",
            ranked.by_user(self.valid_rows),
            [k],
            ITEM_ATTRIBUTE,
            USER_ATTRIBUTE,
            rows=self.valid_rows,
        )["k"][str(k)]

    def valid_point(self, adapter: Path) -> tuple[float, float]:
        """An adapter's validation (MGU, NDCG) at the profile's K."""
        recommender = Recommender.load(self.model_dir, adapter, self.bundle)
        report = self.valid_report(recommender.rank(self.valid_rows, self.decoding))
        return report["MGU"], report["NDCG"]

    def train(self, name: str, **changes: Any) -> tuple[Path, float]:
        out = self.work / name
        self.log(f"{name}: training")
        recipe = replace(self.recipe, **{k: v for k, v in changes.items() if k != "weights"})
        report = train_adapter(
            self.model_dir, self.bundle, out, recipe, weights=changes.get("weights")
        )
        return out, report.seconds

    # --- the systems ----------------------------------------------------------------------

    def original(self) -> Path:
        adapter, seconds = self.train("original")
        self.recommender = Recommender.load(self.model_dir, adapter, self.bundle)
        self.log(f"original: generating for {len(self.test_rows)} test users")
        self.test_generations = self.recommender.generate(self.test_rows, self.decoding)
        self.test_queries = self.recommender.embed(self.test_generations)
        ranked = self.recommender.rank_generations(
            self.test_rows, self.test_generations, self.decoding, queries=self.test_queries
        )
        self.record(
            "original",
            {
                **self.scored(ranked),
                "seconds": seconds,
                "work": "one fine-tuning run (the recipe every retraining repeats)",
                "adapter_digest": weights_digest(adapter),
            },
        )
        return adapter

    def ifairlrs_rw(self, original: Path) -> None:
        samples = training_samples(self.bundle, original)
        weights = ifairlrs_weights(samples, self.popularity)
        adapter, seconds = self.train("ifairlrs_rw", weights=weights)
        self.record(
            "ifairlrs_rw",
            {
                **self.measure_adapter(adapter, "ifairlrs_rw"),
                "seconds": seconds,
                "work": "one fine-tuning run with IFairLRS sample weights",
                "weight_range": [min(weights.values()), max(weights.values())],
            },
        )

    def ifairlrs_rr(self) -> None:
        """α tuned on the validation users from the original's generations; applied to the
        test generations the original already made (reranking needs no new generation)."""
        started = _clock()
        self.log(f"ifairlrs_rr: tuning alpha on {len(self.valid_rows)} validation users")
        generations = self.recommender.generate(self.valid_rows, self.decoding)
        queries = self.recommender.embed(generations)
        item_ids = self.recommender.item_ids

        def valid_at(alpha: float, bias: dict[str, float]) -> tuple[Candidate, dict]:
            scale = distance_scale(item_ids, self.popularity, bias, alpha)
            ranked = self.recommender.rank_generations(
                self.valid_rows, generations, self.decoding, scale, queries
            )
            report = self.valid_report(ranked)
            return Candidate(alpha, report["MGU"], report["NDCG"]), report

        # α = 0 is the original ranking whatever the bias: it measures the bias, then joins
        unchanged, original = valid_at(0.0, dict.fromkeys(self.popularity.names, 0.0))
        bias = group_bias(original["GP"], original["GH"])
        candidates = [unchanged, *(valid_at(alpha, bias)[0] for alpha in ALPHAS if alpha)]
        chosen = choose_alpha(candidates, self.profile.max_ndcg_drop)
        scale = distance_scale(item_ids, self.popularity, bias, chosen.alpha)
        ranked = self.recommender.rank_generations(
            self.test_rows, self.test_generations, self.decoding, scale, self.test_queries
        )
        self.record(
            "ifairlrs_rr",
            {
                **self.scored(ranked),
                "seconds": _clock() - started,
                "work": "validation generation and the alpha search (no training)",
                "alpha": chosen.alpha,
                "group_bias": bias,
                "candidates": [asdict(c) for c in candidates],
            },
        )

    def train_gdrt(
        self, name: str, gains: dict[str, torch.Tensor], settings: GdrtSettings
    ) -> tuple[Path, float]:
        out = self.work / name
        self.log(f"{name}: training with the group-DRO loss, G={settings.groups} τ={settings.tau}")
        report = train_gdrt(self.model_dir, self.bundle, out, gains, settings, self.recipe)
        return out, report.seconds

    def gdrt(self, original: Path) -> None:
        """GDRT by the recipe, its tokens grouped by their history gain under the original
        adapter; (G, τ) chosen on the validation users from the profile's grid, else the
        defaults. Its time is the gains and the chosen run's training (the grid's other runs
        are `tuning_seconds`)."""
        started = _clock()
        self.log("gdrt: the training tokens' history gains under the original adapter")
        gains = history_gains(self.model_dir, original, self.bundle, self.recipe)
        gains_seconds = _clock() - started
        if self.profile.gdrt_grid:
            chosen, adapter, seconds, tuning = self.tune_gdrt(original, gains)
            how = "chosen on validation"
        else:
            chosen, tuning, how = GdrtSettings(), {}, "defaults, not tuned"
            adapter, seconds = self.train_gdrt("gdrt", gains, chosen)
        self.record(
            "gdrt",
            {
                **self.measure_adapter(adapter, "gdrt"),
                "seconds": gains_seconds + seconds,
                "work": "history gains (two scoring passes), one fine-tuning run with the "
                f"group-DRO loss (G={chosen.groups}, τ={chosen.tau}, {how})",
                "settings": asdict(chosen),
                "chosen_by": "validation" if tuning else "defaults",
                "grouping": GROUPING,
                "gains_seconds": gains_seconds,
                **tuning,
            },
        )

    def tune_gdrt(
        self, original: Path, gains: dict[str, torch.Tensor]
    ) -> tuple[GdrtSettings, Path, float, dict[str, Any]]:
        """Every setting of the grid trained and measured on the validation users; the
        fairest within the accuracy budget of the original's validation NDCG is chosen.
        Returns it, its adapter, its training time and what the results record."""
        started = _clock()
        unfairness, ndcg = self.valid_point(original)
        trained: dict[GdrtSettings, tuple[Path, float]] = {}
        trials = []
        for settings in self.profile.gdrt_grid:
            name = f"gdrt-g{settings.groups}-tau{settings.tau}"
            trained[settings] = self.train_gdrt(name, gains, settings)
            trials.append(Trial(settings, *self.valid_point(trained[settings][0])))
        chosen = choose_settings(trials, ndcg, self.profile.max_ndcg_drop).settings
        record = {
            "original_valid": {"unfairness": unfairness, "ndcg": ndcg},
            "candidates": [asdict(trial) for trial in trials],
            "tuning_seconds": _clock() - started,
        }
        return chosen, *trained[chosen], record

    def index(self, adapter: Path, out: Path) -> float:
        started = _clock()
        config = IndexConfig(
            curvature_samples=self.profile.curvature_samples, precision=self.profile.precision
        )
        build_index(self.model_dir, adapter, self.bundle, out, config)
        return _clock() - started

    def job_config(self, biases: Sequence[str]) -> DebiasConfig:
        profile = self.profile
        return DebiasConfig(
            biases=tuple(BiasSpec.parse(bias) for bias in biases),
            query_users=profile.query_users,
            guard_users=profile.guard_users,
            max_ndcg_drop=profile.max_ndcg_drop,
            # a bias the guard users cannot measure (the gender gap with no hit in a group)
            # is left out and recorded, not a crash of the whole run
            drop_unmeasurable=True,
            test_users=0,  # the benchmark measures the test users itself, like every system
            recommend=self.decoding,
            seed=profile.seed,
        )

    def debias(
        self, name: str, adapter: Path, index: Path, index_seconds: float, biases: Sequence[str]
    ) -> tuple[DebiasJob, dict]:
        """One debias job, timed from loading to the written adapter (the index is built, in
        `index_seconds`)."""
        self.log(f"{name}: debias job {', '.join(biases)}")
        started = _clock()
        job = DebiasJob(self.model_dir, adapter, self.bundle, index, self.job_config(biases))
        out = self.work / name
        try:
            report, published = job.run(out), True
        except RepairRejected as rejected:
            report, published = rejected.report, False
            self.log(f"{name}: {rejected}")
        seconds = _clock() - started
        entry: dict[str, Any] = {
            "seconds": seconds,
            "work": "the debias job alone (index already built)",
            "index_seconds": index_seconds,
            "published": published,
            "job_stages": dict(report["seconds"]),  # the job object lives on (random removal)
        }
        if published:
            entry.update(self.measure_adapter(out / "adapter", name))
            entry["eta"] = report["eta"]
        else:  # nothing was published: users keep the original adapter and its metrics
            original = self.systems["original"]
            entry.update(metrics=original["metrics"], metrics_genres=original["metrics_genres"])
            entry["reason"] = report["reason"]
        entry.update(
            temperatures=report["temperatures"],
            eligible=report["eligible"],
            eligibility_test=report["eligibility_test"],
            selection_test=report["selection_test"],
            sample_tests=report["sample_tests"],
            removed=len(report["selected"]),
            predicted=report["predicted"],
            step_search=report["step_search"],
            guard=report["guard"],
            valid=report["metrics"]["valid"],
            dropped_biases=report["dropped_biases"],
        )
        self.record(name, entry)
        return job, report

    def retrain_without(self, selected: list[str]) -> None:
        """From scratch with the selected samples' weights at 0: every other sample sees the
        same batches in the same order, so the difference is S's alone (AdamW ignores the
        loss's (n-|S|)/n scale)."""
        adapter, seconds = self.train("retrain_without_s", weights=dict.fromkeys(selected, 0.0))
        self.record(
            "retrain_without_s",
            {
                **self.measure_adapter(adapter, "retrain_without_s"),
                "seconds": seconds,
                "work": "one fine-tuning run without FUDLR's selection",
                "removed": len(selected),
            },
        )

    def random_removal(self, job: DebiasJob, weights: list[float], eta: float) -> None:
        """The same Newton step and η as FUDLR's, on as many random training samples with
        FUDLR's weights (`random_step`: the samples the job's random control draws)."""
        from fudlr.repair.acceptance import random_step
        from fudlr.repair.unlearn import WeightPatcher

        started = _clock()
        patcher = WeightPatcher(job.model, random_step(job, weights))
        patcher.apply(eta)
        seconds = _clock() - started
        try:
            measured = self.measure(job.recommender, "random_removal")
        finally:
            patcher.restore()
        self.record(
            "random_removal",
            {
                **measured,
                "seconds": seconds,
                "work": "gradients of the random samples and the Newton step",
                "removed": len(weights),
                "eta": eta,
            },
        )

    def most_popular(self) -> dict[str, Any]:
        """The reference every system is read against (no model): its accuracy is the floor
        a recommender must clear, its unfairness the popularity bias at its extreme."""
        counts = interaction_counts(self.bundle.items)
        rankings = most_popular(counts, self.test_rows, max(self.profile.ks))
        return {
            **self.metrics(rankings),
            "lists": self.top_lists(rankings),
            "work": "the catalog's most interacted items outside the user's history",
        }

    def skipped(self, name: str, reason: str) -> None:
        self.log(f"{name}: skipped: {reason}")
        self.record(name, {"skipped": reason, "metrics": None, "seconds": None})

    # --- the run -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        original = self.original()
        self.ifairlrs_rr()
        self.ifairlrs_rw(original)
        self.gdrt(original)
        index_dir = self.work / "index"
        index_seconds = self.index(original, index_dir)
        job, report = self.debias(
            "fudlr", original, index_dir, index_seconds, [item_bias_label(self.profile.k)]
        )
        selected = [row["sample_id"] for row in report["selected"]]
        if selected:
            self.retrain_without(selected)
            weights = [row["weight"] for row in report["selected"]]
            # the η FUDLR published, else the first one its guard tried
            eta = report["eta"] or next((trial["eta"] for trial in report["guard"]), 1.0)
            self.random_removal(job, weights, eta)
        else:
            self.skipped("retrain_without_s", "FUDLR selected no sample")
            self.skipped("random_removal", "FUDLR selected no sample")
        del job
        self.fudlr_multi(original, index_dir, index_seconds)
        return self.summary(self.scaling(index_seconds))

    def fudlr_multi(self, original: Path, index: Path, index_seconds: float) -> None:
        """FUDLR on the popularity bias and the gender gap at once."""
        k = self.profile.k
        biases = [item_bias_label(k), f"user:{USER_ATTRIBUTE}:NDCG@{k}"]
        self.debias("fudlr_multi", original, index, index_seconds, biases)

    def summary(self, scaling: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "train_size": len(self.bundle.split("train")),
            "test_users": len(self.test_rows),
            "valid_users": len(self.valid_rows),
            "systems": {name: self.systems[name] for name in SYSTEMS},
            "changes": self.changes(),
            "references": {"most_popular": self.most_popular()},
            "scaling": scaling,
            "profile_settings": asdict(self.profile),
        }

    def scaling(self, index_seconds: float) -> list[dict[str, Any]]:
        """Retraining, index and job time at each size; the largest is the main run's
        (none without `scaling_sizes`)."""
        points = []
        n = len(self.bundle.split("train"))
        biases = [item_bias_label(self.profile.k)]
        for size in self.profile.scaling_sizes:
            if size >= n:
                fudlr = self.systems["fudlr"]
                retraining = self.systems["original"]["seconds"]
                job_seconds, stages = fudlr["seconds"], fudlr["job_stages"]
                size_index = index_seconds
            else:
                name = f"scaling-{size}"
                adapter, retraining = self.train(name, max_samples=size)
                index = self.work / f"{name}-index"
                size_index = self.index(adapter, index)
                started = _clock()
                job = DebiasJob(
                    self.model_dir, adapter, self.bundle, index, self.job_config(biases)
                )
                with contextlib.suppress(RepairRejected):  # the time is what is measured
                    job.run(self.work / f"{name}-job")
                job_seconds, stages = _clock() - started, job.timings
            points.append(
                {
                    "train_size": min(size, n),
                    "retraining_seconds": retraining,
                    "index_seconds": size_index,
                    "job_seconds": job_seconds,
                    "job_stages": stages,
                }
            )
        return points
