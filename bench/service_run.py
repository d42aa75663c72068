"""FUDLR's job once more, through the HTTP service: how much does the service add?

Registers the benchmark's original adapter with an embedded `fudlr serve` (its worker
builds the index), submits the same job and times both from the client's side, next to
the worker's own start/finish stamps.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from clients.embedded import create_key, embedded_service
from clients.sdk import Client


def through_the_service(
    model_dir: Path,
    adapter: Path,
    bundle_dir: Path,
    work: Path,
    index: dict[str, Any],
    biases: list[str],
    options: dict[str, Any],
    port: int,
) -> dict[str, Any]:
    """Register, index, submit, wait; seconds of each as a client sees them."""
    data = work / "service"
    shutil.rmtree(data, ignore_errors=True)  # a queue of its own: no job left from a past run
    service = embedded_service(data, port, work / "service.log", model_roots=[model_dir.parent])
    with service as env:
        key = create_key(env, "bench")
        with Client(env["FUDLR_URL"], key) as client:
            started = time.perf_counter()
            # the benchmark's protocol: grounded decoding
            recommender = client.register(
                "bench", model_dir, adapter, bundle_dir, index, decoding="grounded"
            )
            client.wait_ready(recommender.id)
            index_seconds = time.perf_counter() - started
            started = time.perf_counter()
            job = client.submit(recommender.id, biases, options=options)
            done = client.watch(job.id, lambda *_: None, poll=0.5)
            job_seconds = time.perf_counter() - started
    worker_seconds = (
        (done.finished_at - done.started_at).total_seconds()
        if done.started_at and done.finished_at
        else None
    )
    return {
        "index_seconds": index_seconds,
        "job_seconds": job_seconds,
        "job_worker_seconds": worker_seconds,
        "state": done.state,
        "error": done.error.detail if done.error else None,
    }
