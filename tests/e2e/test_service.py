"""End to end on the tiny model: real `fudlr serve` and `fudlr worker` processes, PostgreSQL
and Redis; the embedded mode (SQLite, filesystem broker) through the command line."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch

from clients.models import JobOut
from clients.sdk import ApiError, Client, JobFailed
from tests.e2e.conftest import PLANTED_JOB, Cluster, fudlr, start_cluster
from tests.integration.harness import wait_for

pytestmark = pytest.mark.slow  # every test runs debias jobs in worker processes

TIMEOUT = 600  # seconds; CI machines are small and shared


def _logits(base_model: Path, adapter: Path, prompt: str) -> torch.Tensor:
    from peft import PeftModel

    from fudlr.models.store import load_base_model

    base, tokenizer = load_base_model(base_model)
    model = PeftModel.from_pretrained(base, str(adapter))  # stock PEFT, nothing of ours
    with torch.no_grad():
        return model(tokenizer(prompt, return_tensors="pt").input_ids).logits


@pytest.fixture(scope="module")
def recommender(cluster: Cluster, planted, tiny_model: Path) -> str:
    bundle, adapter = planted
    with cluster.client() as client:
        created = client.register("planted", tiny_model, adapter, bundle, {"batch_size": 16})
        assert created.state == "indexing" and created.latest_version == 1
        client.wait_ready(created.id, timeout=TIMEOUT)
        assert client.recommender(created.id).state == "ready"
    return created.id


def test_debias_end_to_end(cluster: Cluster, recommender: str, planted, tiny_model, tmp_path):
    bundle, _ = planted
    with cluster.client() as client:
        job = client.submit(recommender, **PLANTED_JOB)
        assert job.state == "queued" and job.version == 1

        seen = []

        def finished():
            current = client.job(job.id)
            seen.append((current.state, current.stage, current.progress))
            return current if current.state in ("succeeded", "failed", "cancelled") else None

        done = wait_for(finished, timeout=TIMEOUT, interval=0.05, what="the job")
        assert done.state == "succeeded", done.error
        assert any(state == "running" and stage for state, stage, _ in seen), seen
        assert done.result_version == 2 and done.attempts == 1 and done.finished_at
        label = "item:popularity_group:MGU@1"
        assert done.metrics.after["biases"][label] < done.metrics.before["biases"][label]
        assert done.metrics.test is not None and f"{label}:after" in done.metrics.predicted
        # the published step's accuracy check, as the guard judged it; nothing was dropped
        report = client.report(job.id)
        assert done.metrics.accuracy == report["accuracy"] and done.metrics.accuracy["k"] == 10
        assert isinstance(done.metrics.accuracy["resolved"], bool)
        assert done.metrics.dropped_biases == []

        messages = [event.message for event in client.events(job.id, limit=1000)]
        assert (
            messages[0] == "queued on version 1"
            and messages[-1] == "succeeded: version 2 published"
        )
        assert any(m.startswith("selected ") for m in messages) and any(
            "guard, eta=" in m for m in messages
        )
        stages = [e.stage for e in client.events(job.id, limit=1000) if e.kind == "stage"]
        assert len(stages) >= 2

        report = client.report(job.id)
        selected = {entry["sample_id"] for entry in report["selected"]}
        assert selected and sum(s.startswith("planted-") for s in selected) / len(selected) >= 0.6

        v1, v2 = client.versions(recommender)
        assert (v2.number, v2.parent, v2.job_id) == (2, 1, job.id) and v1.job_id is None
        assert v2.digest != v1.digest

        first = client.download(recommender, 1, tmp_path / "v1")
        second = client.download(recommender, 2, tmp_path / "v2")
        assert (first / "adapter_config.json").read_bytes() == (
            second / "adapter_config.json"
        ).read_bytes()
        assert json.loads((second / "fudlr-repair.json").read_text())["removed_samples"] == len(
            selected
        )
        prompt = json.loads((bundle / "valid.jsonl").read_text().splitlines()[0])["prompt"]
        assert not torch.allclose(
            _logits(tiny_model, first, prompt), _logits(tiny_model, second, prompt)
        )

        url = f"{cluster.url}/v1/recommenders/{recommender}/versions/2/adapter"
        headers = {"Authorization": f"Bearer {cluster.key}", "If-None-Match": f'"{v2.digest}"'}
        assert httpx.get(url, headers=headers).status_code == 304

        with pytest.raises(ApiError) as finished_cancel:
            client.cancel(job.id)
        assert finished_cancel.value.status == 409 and finished_cancel.value.code == "job_finished"

        wait_for(
            lambda: client.version(recommender, 2).state == "ready",
            timeout=TIMEOUT,
            what="v2 index",
        )


def test_a_rejected_repair_fails_with_its_reason_and_publishes_nothing(
    cluster: Cluster, recommender: str
):
    with cluster.client() as client:
        versions = len(client.versions(recommender))
        options = {**PLANTED_JOB["options"], "step_sizes": [1e-6], "test_users": 0}
        job = client.submit(
            recommender,
            PLANTED_JOB["biases"],
            version=1,
            budget=PLANTED_JOB["budget"],
            options=options,
        )
        with pytest.raises(JobFailed) as failed:
            client.wait(job.id, progress=False, poll=0.2, timeout=TIMEOUT)
        error = failed.value.job.error
        assert failed.value.job.state == "failed" and error.code == "repair_rejected"
        # η = 1e-6 changes no recommendation of the query users: nothing for the guard
        assert "no step size lowers the bias on the query users" in error.detail
        assert failed.value.job.result_version is None
        assert len(client.versions(recommender)) == versions
        report = client.report(job.id)  # what was found, for diagnosis
        assert report["status"] == "rejected" and report["eta"] is None
        assert report["reason"] == error.detail
        assert [t["eta"] for t in report["step_search"]] == [1e-6] and report["guard"] == []
        assert report["step_search"][0]["bias_change"] == 0.0
        assert not report["step_search"][0]["improves"] and report["selected"]
        assert "after" not in report["metrics"]["valid"]


def test_a_running_job_is_cancelled_between_batches(cluster: Cluster, recommender: str):
    with cluster.client() as client:
        versions = len(client.versions(recommender))
        job = _submit_until_running(client, recommender)
        assert client.cancel(job.id).state == "cancelling"
        done = client.watch(job.id, lambda *_: None, poll=0.2, timeout=TIMEOUT)
        assert done.state == "cancelled" and done.result_version is None and done.error is None
        messages = [event.message for event in client.events(job.id, limit=1000)]
        assert "cancel requested" in messages and messages[-1].startswith("cancelled")
        assert not any(m.startswith("succeeded") for m in messages)
        assert len(client.versions(recommender)) == versions
        with pytest.raises(ApiError, match="job_finished"):
            client.cancel(job.id)


def _submit_until_running(client: Client, recommender: str) -> JobOut:
    """The planted job on version 1, once a worker has claimed it."""
    job = client.submit(
        recommender,
        PLANTED_JOB["biases"],
        version=1,
        budget=PLANTED_JOB["budget"],
        options={**PLANTED_JOB["options"], "test_users": 0},
    )
    wait_for(
        lambda: client.job(job.id).state == "running",
        timeout=TIMEOUT,
        interval=0.05,
        what="a claim",
    )
    return job


def _loads_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_a_worker_killed_mid_job_is_replaced_and_the_job_finishes_once(
    cluster: Cluster, recommender: str
):
    with cluster.client() as client:
        job = _submit_until_running(client, recommender)
        victim = cluster.workers[-1]
        if Path("/proc").is_dir():  # CUDA/torch live in the task's child, never the worker
            assert not _loads_torch(victim.process.pid)
        victim.kill(signal.SIGKILL)
        time.sleep(1)
        assert client.job(job.id).state == "running"  # nobody knows yet: the lease runs out
        cluster.start_worker()
        done = client.watch(job.id, lambda *_: None, poll=0.5, timeout=TIMEOUT)
        assert done.state == "succeeded", (done.error, cluster.workers[-1].tail())
        assert done.attempts == 2
        messages = [event.message for event in client.events(job.id, limit=1000)]
        assert any("was lost (lease expired); requeued" in m for m in messages), messages
        assert sum(m.startswith("running on") for m in messages) == 2
        made = [v for v in client.versions(recommender) if v.job_id == job.id]
        assert len(made) == 1 and made[0].number == done.result_version


def test_the_embedded_mode_through_the_command_line(tmp_path: Path, planted, tiny_model: Path):
    """`fudlr serve` alone (SQLite, local artifacts, filesystem broker, its own worker), used
    through `fudlr register / submit / status / download`."""
    bundle, adapter = planted
    cluster = start_cluster({"cancel_poll_seconds": 0.2}, tmp_path, ())
    try:
        env = cluster.env
        recommender = fudlr(
            env,
            "register",
            "--name",
            "cli",
            "--base-model",
            str(tiny_model),
            "--adapter",
            str(adapter),
            "--bundle",
            str(bundle),
            "--wait",
        ).strip()
        assert recommender.startswith("rec_")
        job = (
            fudlr(
                env,
                "submit",
                recommender,
                "--bias",
                PLANTED_JOB["biases"][0],
                "--max-fraction",
                "0.3",
                "--max-ndcg-drop",
                "0.9",
                "--option",
                "pool_per_group=6",
                "--option",
                "num_beams=2",
                "--option",
                "decoding=grounded",
                "--option",
                "test_users=0",
                "--wait",
            )
            .strip()
            .splitlines()[-1]
        )
        assert job.startswith("job_")
        assert "succeeded" in fudlr(env, "status", job)
        fudlr(env, "download", recommender, "--out", str(tmp_path / "repaired"))
        config = (tmp_path / "repaired" / "adapter_config.json").read_bytes()
        assert config == (adapter / "adapter_config.json").read_bytes()
        assert (tmp_path / "repaired" / "fudlr-repair.json").is_file()
    finally:
        cluster.stop()
    wait_for(
        lambda: _group_gone(cluster.api.process.pid), timeout=60, what="serve's worker to stop"
    )


def _group_gone(group: int) -> bool:
    """True once no process of the group is left (serve stops the worker it started)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return True
    return False
