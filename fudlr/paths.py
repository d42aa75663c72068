"""Where FUDLR keeps what it downloads or derives once: source data, converted models, caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$FUDLR_CACHE_DIR`, else `~/.cache/fudlr`; every cache of the method lives under it."""
    configured = os.environ.get("FUDLR_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "fudlr"


def model_store() -> Path:
    """Converted base models: `$FUDLR_MODEL_STORE`, else `<cache>/models`."""
    configured = os.environ.get("FUDLR_MODEL_STORE")
    return Path(configured) if configured else cache_dir() / "models"
