"""A requeued index task reuses an index its lost predecessor finished."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from fudlr.influence.index import FORMAT, MANIFEST, IndexConfig, adapter_weights_digest
from fudlr.models.lora import ADAPTER_WEIGHTS
from fudlr.models.store import model_digest
from workers.runner import _built


def test_a_finished_index_of_the_same_inputs_is_recognised(tmp_path: Path, tiny_model) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / ADAPTER_WEIGHTS).write_bytes(b"weights")
    index = tmp_path / "index"
    config = IndexConfig()
    assert not _built(index, tiny_model, adapter, config)  # nothing there
    index.mkdir()
    manifest = {
        "format": FORMAT,
        "config": json.loads(json.dumps(asdict(config))),
        "adapter_digest": adapter_weights_digest(adapter),
        "base_model_digest": model_digest(tiny_model),
    }
    (index / MANIFEST).write_text(json.dumps(manifest))
    assert _built(index, tiny_model, adapter, config)
    assert not _built(index, tiny_model, adapter, IndexConfig(kind="kfac"))
    (adapter / ADAPTER_WEIGHTS).write_bytes(b"other weights")
    assert not _built(index, tiny_model, adapter, config)
