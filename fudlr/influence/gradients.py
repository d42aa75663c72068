"""Per-sample gradients of the training losses: computed in one pass, or read from a cache.

Everything FUDLR needs from the training set is linear in these gradients: influence
scores are dot products with preconditioned query vectors, and the unlearning step
needs their weighted sum. So one pass (or one read of the cache) serves both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from fudlr.control import Control
from fudlr.influence.tracker import GradientTracker, LoraLinear
from fudlr.recommender.encoding import EncodedSample, length_sorted_batches, per_sample_loss

GradientRows = Iterator[tuple[list[int], torch.Tensor]]  # (sample indices, [rows, dim] float32)
LossGradientRows = Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]  # ..., losses [rows]


def compute_sample_gradients(
    model: torch.nn.Module,
    linears: list[LoraLinear],
    to_rows: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    samples: Sequence[EncodedSample],
    *,
    batch_size: int,
    pad_id: int,
    control: Control,
    stage: str = "sample gradients",
    precision: str = "fp32",
) -> LossGradientRows:
    """ℓ_i and ∇ℓ_i of every sample (mean completion NLL, true labels), a batch at a time;
    `to_rows` turns the per-layer gradients into rows (a layout's flatten, or a projection)."""
    from fudlr.models.device import autocast

    device = next(model.parameters()).device
    tracker = GradientTracker(linears)
    total = -(-len(samples) // batch_size)
    with tracker.track():
        for done, (indices, batch) in enumerate(
            length_sorted_batches(samples, batch_size, pad_id), start=1
        ):
            model.zero_grad(set_to_none=True)
            with autocast(device, precision):
                losses = per_sample_loss(model, batch.to(device))
            losses.sum().backward()
            rows = to_rows(tracker.per_sample_gradients()).cpu()
            tracker.clear()
            yield indices, rows, losses.detach().cpu()
            control.step(stage, done, total)
    model.zero_grad(set_to_none=True)


class GradientCache:
    """All per-sample gradients on disk: float16 rows scaled to [-1, 1] + a float32 scale each.

    Per-row scaling keeps fp16's 11-bit precision for every sample whatever its
    gradient's magnitude, at half the size of float32.
    """

    ROWS, SCALES = "gradients.f16", "gradient_scales.npy"

    def __init__(self, directory: Path, samples: int, dim: int, mode: str = "r") -> None:
        self.directory = directory
        self.samples, self.dim = samples, dim
        self.rows = np.memmap(
            directory / self.ROWS, dtype=np.float16, mode=mode, shape=(samples, dim)
        )
        scales_path = directory / self.SCALES
        self.scales = np.zeros(samples, dtype=np.float32) if mode == "w+" else np.load(scales_path)

    @staticmethod
    def bytes_per_row(dim: int) -> int:
        return 2 * dim + 4  # float16 coordinates + a float32 scale

    @classmethod
    def create(cls, directory: Path, samples: int, dim: int) -> GradientCache:
        return cls(directory, samples, dim, mode="w+")

    def write(self, indices: list[int], rows: torch.Tensor) -> None:
        scales = rows.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        self.rows[indices] = (rows / scales[:, None]).numpy().astype(np.float16)
        self.scales[indices] = scales.numpy()

    def close(self) -> None:
        self.rows.flush()
        np.save(self.directory / self.SCALES, self.scales)

    def read(self, chunk: int = 128) -> GradientRows:
        for start in range(0, self.samples, chunk):
            stop = min(start + chunk, self.samples)
            rows = torch.from_numpy(np.asarray(self.rows[start:stop], dtype=np.float32))
            scales = torch.from_numpy(self.scales[start:stop])
            yield list(range(start, stop)), rows * scales[:, None]


def dot_with_queries(rows: GradientRows, queries: torch.Tensor, samples: int) -> torch.Tensor:
    """[samples, k] = every gradient · every query column ([dim, k])."""
    scores = torch.zeros(samples, queries.size(1), dtype=torch.float64)
    for indices, block in rows:
        scores[indices] = (block @ queries).double()
    return scores


def weighted_sum(rows: GradientRows, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i ∇ℓ_i over the samples with a non-zero weight, as one [dim] vector."""
    total = None
    for indices, block in rows:
        block_weights = weights[indices].to(block.dtype)
        if torch.count_nonzero(block_weights) == 0:
            continue
        contribution = block_weights @ block
        total = contribution if total is None else total + contribution
    if total is None:
        raise ValueError("every weight is zero: nothing to remove")
    return total
