"""What a training-set index keeps of each sample's gradient (no torch: the service's
request path validates it)."""

from __future__ import annotations

from enum import StrEnum


class Projection(StrEnum):
    """How the index stores each training sample's gradient."""

    DENSE = "dense"  # every LoRA weight
    EIGENBASIS = "eigenbasis"  # the curvature's top eigen-coordinates


DEFAULT_PROJECTION = Projection.EIGENBASIS
DEFAULT_PROJECTION_DIM = 4096  # coordinates kept per training sample
