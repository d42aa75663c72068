"""An index's manifest (index.json), readable without torch: the service checks a job
against the index of its version before it queues it."""

from __future__ import annotations

from typing import Any

from fudlr.influence.projection import Projection

MANIFEST = "index.json"
FORMAT = 2  # 2: the gradient cache may be projected (format 1 indexes are dense)
READABLE_FORMATS = (1, 2)


def stored_projection(manifest: dict[str, Any]) -> Projection:
    """The projection an index manifest records (indexes from before projections: dense)."""
    return Projection(manifest.get("projection", {}).get("kind", Projection.DENSE))
