"""The training-set index of one adapter version: curvature + (optionally) all sample gradients.

Built once per adapter version (about one forward+backward over the training set, plus
a curvature fit on a subset); every debias job on that version then needs no pass over
the training set. The manifest pins what it was built from, and loading refuses an
index whose base model, adapter or training samples changed.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from fudlr.control import Control
from fudlr.data.bundle import Bundle
from fudlr.data.jsonl import dump_line
from fudlr.data.schema import SampleRow
from fudlr.errors import FudlrError, InputError
from fudlr.hashing import file_sha256
from fudlr.influence.curvature import FISHERS, KINDS, Curvature
from fudlr.influence.eigenbasis import EigenProjection
from fudlr.influence.gradients import GradientCache
from fudlr.influence.layout import ParameterLayout
from fudlr.influence.manifest import (
    FORMAT,
    MANIFEST,
    READABLE_FORMATS,
    candidate_positions,
    stored_projection,
)
from fudlr.influence.projection import DEFAULT_PROJECTION, DEFAULT_PROJECTION_DIM, Projection

CURVATURE = "curvature.safetensors"
PROJECTION = "projection.safetensors"


@dataclass(frozen=True)
class IndexConfig:
    """How the index is built.

    kind: "ekfac" (eigenvalue-corrected) or "kfac". fisher: "true" (labels sampled from
    the model: the Gauss-Newton matrix) or "empirical" (the training labels).
    damping_factor: λ = factor × mean eigenvalue, per LoRA linear. Large on purpose: the
    adapter was trained for few steps, not to a minimum, so small-eigenvalue directions
    are where a lightly damped inverse extrapolates furthest from what retraining does
    (on the tiny model, predicted changes overshoot retrained ones ~10× at 0.1 and track
    them at 10); it also keeps the Newton step inside the region where it is linear.
    curvature_samples:
    fit the curvature on a fixed-seed subset of this many samples (None = all).
    candidates: index a fixed-seed subset of this many training samples (None = all): a
    job then scores and selects among them only, while its Newton step still weighs each
    removal as 1/n of the whole training set. For training sets too large to pass over
    once per version: the candidates are a uniform sample, so what the selection finds
    among them is what it would find in a training set of their size.
    gradient_cache: store every sample's gradient (fp16 + one scale per sample) so that
    scoring needs no pass over the training set. projection: what of each gradient the
    cache keeps: `eigenbasis` (the `projection_dim` eigen-coordinates of the curvature that
    carry the most of an influence score; the Newton step then recomputes the selected
    samples' full gradients) or `dense` (every LoRA weight; bytes grow with the adapter).
    precision: fp32, or bf16 autocast for the passes (faster; gradients still accumulate
    in fp32).
    """

    kind: str = "ekfac"
    fisher: str = "true"
    damping_factor: float = 10.0
    curvature_samples: int | None = 1000
    candidates: int | None = None
    gradient_cache: bool = True
    projection: Projection = DEFAULT_PROJECTION
    projection_dim: int = DEFAULT_PROJECTION_DIM
    batch_size: int = 8
    max_length: int = 256
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self) -> None:
        from fudlr.models.device import PRECISIONS

        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision '{self.precision}' (use fp32 or bf16)")
        if self.kind not in KINDS:
            raise InputError(f"unknown curvature kind '{self.kind}' (use {' or '.join(KINDS)})")
        if self.fisher not in FISHERS:
            raise InputError(f"unknown fisher '{self.fisher}' (use {' or '.join(FISHERS)})")
        if not self.damping_factor > 0:
            raise InputError("damping_factor must be positive")
        if self.projection not in tuple(Projection):
            raise InputError(
                f"unknown projection '{self.projection}' (use {' or '.join(Projection)})"
            )
        if self.projection_dim < 1:
            raise InputError("projection_dim must be at least 1")
        if self.candidates is not None and self.candidates < 1:
            raise InputError("candidates must be at least 1")


def training_samples(bundle: Bundle, adapter_dir: Path) -> list[SampleRow]:
    """The exact samples the adapter was tuned on: those its fudlr-train.json lists, if any,
    else the whole train split (a registered adapter must come with its exact training set)."""
    from fudlr.recommender.train import TRAIN_MANIFEST

    samples = bundle.split("train")
    manifest_path = adapter_dir / TRAIN_MANIFEST
    if not manifest_path.is_file():
        return list(samples)
    listed = json.loads(manifest_path.read_text())["sample_ids"]
    by_id = {sample.sample_id: sample for sample in samples}
    missing = [sample_id for sample_id in listed if sample_id not in by_id]
    if missing:
        raise InputError(
            f"the adapter was trained on {len(missing)} samples missing from the train split "
            f"(first: '{missing[0]}')",
            file=bundle.root / "train.jsonl",
        )
    return [by_id[sample_id] for sample_id in listed]


def samples_digest(samples: list[SampleRow]) -> str:
    hasher = hashlib.sha256()
    for sample in samples:
        hasher.update(dump_line(sample).encode())
    return hasher.hexdigest()


@dataclass
class TrainingIndex:
    """A loaded index: its manifest, curvature, layout, gradient cache if built, and the
    projection its cached rows are in (None: dense rows, or no cache)."""

    root: Path
    manifest: dict
    curvature: Curvature
    layout: ParameterLayout
    cache: GradientCache | None
    projection: EigenProjection | None

    @property
    def samples(self) -> int:
        """n: the size of the whole training set (a removal weighs 1/n)."""
        return self.manifest["samples"]

    @property
    def candidates(self) -> list[int]:
        """Positions in the training set of the indexed samples, in the cache's row order."""
        return candidate_positions(self.manifest)

    @property
    def projection_kind(self) -> Projection:
        return stored_projection(self.manifest)

    @property
    def precision(self) -> str:
        """The precision the cached gradients were computed in: a job computes its query
        gradients and recomputed sample gradients alike, so both sides of a score match."""
        return self.manifest["config"].get("precision", "fp32")

    def precondition(self, queries: torch.Tensor) -> torch.Tensor:
        """H⁻¹ q for each query row ([k, dim]) in the coordinates of the cached rows, so
        that a score is one dot product with a cached row (every LoRA weight without a
        projected cache)."""
        per_layer = self.layout.unflatten(queries.float())
        if self.projection is None:
            return self.layout.flatten(self.curvature.precondition(per_layer))
        return self.projection.precondition(self.curvature, per_layer)

    @property
    def sample_ids(self) -> list[str]:
        return json.loads((self.root / "sample_ids.json").read_text())

    @classmethod
    def load(
        cls,
        root: Path,
        *,
        base_model_digest: str,
        adapter_digest: str,
        train_digest: str,
    ) -> TrainingIndex:
        path = root / MANIFEST
        if not path.is_file():
            raise InputError("not a training-set index (index.json missing)", file=root)
        manifest = json.loads(path.read_text())
        if manifest.get("format") not in READABLE_FORMATS:
            raise InputError(
                f"index format {manifest.get('format')} is not readable (rebuild it with "
                "`fudlr index`)",
                file=path,
            )
        expected = {
            "base_model_digest": base_model_digest,
            "adapter_digest": adapter_digest,
            "train_digest": train_digest,
        }
        for key, value in expected.items():
            if manifest[key] != value:
                what = key.removesuffix("_digest").replace("_", " ")
                raise InputError(
                    f"the index was built for another {what} ({manifest[key][:12]} != "
                    f"{value[:12]}); rebuild it with `fudlr index`",
                    file=path,
                )
        layout = ParameterLayout(
            tuple(entry["name"] for entry in manifest["layout"]),
            tuple(tuple(entry["shape"]) for entry in manifest["layout"]),
        )
        cache = projection = None
        if manifest["gradient_cache"]:
            dim = layout.dim
            if stored_projection(manifest) == Projection.EIGENBASIS:
                projection = EigenProjection.load(root / PROJECTION, layout)
                dim = projection.dim
            cache = GradientCache(root, len(candidate_positions(manifest)), dim)
        return cls(root, manifest, Curvature.load(root / CURVATURE), layout, cache, projection)


def build_index(
    base_model_dir: Path,
    adapter_dir: Path,
    bundle: Bundle,
    out_dir: Path,
    config: IndexConfig = IndexConfig(),
    device: str = "auto",
    control: Control | None = None,
) -> dict:
    """Fit the curvature and cache the sample gradients of one adapter version into `out_dir`."""
    from fudlr.influence.curvature import fit_curvature
    from fudlr.influence.gradients import compute_sample_gradients
    from fudlr.influence.tracker import lora_linears
    from fudlr.models.device import resolve_device
    from fudlr.models.lora import load_adapter
    from fudlr.models.store import load_base_model, model_digest
    from fudlr.recommender.encoding import encode_sample, length_sorted_batches

    control = control or Control()
    samples = training_samples(bundle, adapter_dir)
    if not samples:
        raise InputError("the training set is empty", file=bundle.root / "train.jsonl")
    target = resolve_device(device)
    base, tokenizer = load_base_model(base_model_dir, target)
    model = load_adapter(base, adapter_dir, trainable=True)
    linears = lora_linears(model)
    layout = ParameterLayout.of(linears)
    encoded = [encode_sample(tokenizer, s.prompt, s.completion, config.max_length) for s in samples]
    candidates = list(range(len(samples)))
    if config.candidates is not None and config.candidates < len(samples):
        candidates = sorted(random.Random(config.seed).sample(candidates, config.candidates))
    timings: dict[str, float] = {}

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        started = time.perf_counter()
        subset = encoded
        if config.curvature_samples is not None and config.curvature_samples < len(encoded):
            chosen = random.Random(config.seed).sample(
                range(len(encoded)), config.curvature_samples
            )
            subset = [encoded[index] for index in sorted(chosen)]
        curvature_batches = -(-len(subset) // config.batch_size)
        control.event(f"fitting {config.kind} curvature on {len(subset)} samples")
        curvature = fit_curvature(
            model,
            linears,
            lambda: length_sorted_batches(subset, config.batch_size, tokenizer.pad_token_id),
            kind=config.kind,
            fisher=config.fisher,
            damping_factor=config.damping_factor,
            seed=config.seed,
            control=control,
            total_batches=curvature_batches,
            precision=config.precision,
        )
        curvature.save(staging / CURVATURE)
        timings["curvature"] = time.perf_counter() - started

        stored = {"kind": Projection.DENSE.value, "dim": layout.dim}
        if config.gradient_cache:
            started = time.perf_counter()
            to_rows = layout.flatten
            if config.projection == Projection.EIGENBASIS:
                projection = EigenProjection.fit(curvature, layout, config.projection_dim)
                projection.save(staging / PROJECTION)
                to_rows = partial(projection.project, curvature)
                stored = {
                    "kind": Projection.EIGENBASIS.value,
                    "dim": projection.dim,
                    "kept_share": projection.kept_share(curvature),
                }
            control.event(
                f"caching the gradients of {len(candidates)} of {len(encoded)} training samples "
                f"({stored['kind']}, {stored['dim']:,} numbers each)"
            )
            cache = GradientCache.create(staging, len(candidates), stored["dim"])
            for indices, rows, _losses in compute_sample_gradients(
                model,
                linears,
                to_rows,
                [encoded[position] for position in candidates],
                batch_size=config.batch_size,
                pad_id=tokenizer.pad_token_id,
                control=control,
                precision=config.precision,
            ):
                cache.write(indices, rows)
            cache.close()
            timings["gradients"] = time.perf_counter() - started

        (staging / "sample_ids.json").write_text(json.dumps([s.sample_id for s in samples]))
        manifest = {
            "format": FORMAT,
            "base_model_digest": model_digest(base_model_dir),
            "adapter_digest": adapter_weights_digest(adapter_dir),
            "train_digest": samples_digest(samples),
            "samples": len(samples),
            "candidates": candidates if len(candidates) < len(samples) else None,
            "tokens": sum(len(sample.input_ids) for sample in encoded),
            "layout": layout.describe(),
            "dim": layout.dim,
            "config": asdict(config),
            "gradient_cache": config.gradient_cache,
            "projection": stored,
            "bytes_per_sample": GradientCache.bytes_per_row(stored["dim"])
            if config.gradient_cache
            else 0,
            "seconds": timings,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.replace(out_dir)
    return manifest


def adapter_weights_digest(adapter_dir: Path) -> str:
    from fudlr.models.lora import ADAPTER_WEIGHTS

    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FudlrError(f"{path}: adapter weights missing")
    return file_sha256(path)
