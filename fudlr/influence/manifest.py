"""An index's manifest (index.json), readable without torch: the service checks a job
against the index of its version before it queues it."""

from __future__ import annotations

from typing import Any

from fudlr.influence.projection import Projection

MANIFEST = "index.json"
# 2: the gradient cache may be projected (format 1 indexes are dense); 3: it may hold a
# subset of the training samples (`candidates`, their positions in the training set)
FORMAT = 3
READABLE_FORMATS = (1, 2, 3)


def stored_projection(manifest: dict[str, Any]) -> Projection:
    """The projection an index manifest records (indexes from before projections: dense)."""
    return Projection(manifest.get("projection", {}).get("kind", Projection.DENSE))


def candidate_positions(manifest: dict[str, Any]) -> list[int]:
    """Positions in the training set of the samples an index holds, in its rows' order
    (every sample unless it was built with `candidates`)."""
    return manifest.get("candidates") or list(range(manifest["samples"]))
