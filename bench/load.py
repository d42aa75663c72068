"""Many clients polling one job: does the API hold, and do its health probes still answer?

Starts a real `fudlr serve` (embedded: SQLite, or `--database-url postgresql://...`) on
loopback, seeds one tenant with a job, then runs `--pollers` asynchronous clients, each on
its own keep-alive connection, for `--seconds`: every poller asks `GET /v1/jobs/{id}`,
waits `--interval` seconds (a progress bar's refresh), and asks again. Beside them a probe
asks `/healthz` and `/readyz` on fresh connections, during the load and for a few seconds
after it. Writes req/s, latency percentiles, errors by kind and the probes' latencies to
`bench/results/load-<database>-<date>-<commit>.json`.

`--job` also registers a tiny recommender and submits real debias jobs (the tenant's quota,
four, run one after another: a tiny job can end within seconds), so the worker competes
for the same cores (the measurement the service is judged by) and the pollers poll the
first; without it the polled job is a seeded row that no worker runs. The results record
the states the pollers saw (`job_states`), every job's state after the load
(`jobs_after`), and the tail per 10-s window (`polls_by_10s`).

    python -m bench.load --pollers 200 --seconds 60 --job
    python -m bench.load --database-url postgresql://postgres@127.0.0.1:5432/test --job
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import statistics
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import RESULTS, commit

_TIMEOUT = 30.0


@dataclass
class Tally:
    """Latencies of answered requests (seconds) and failures by kind."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    states: Counter[str] = field(default_factory=Counter)
    started: list[float] = field(default_factory=list)

    def windows(self, origin: float, width: float = 10.0) -> list[dict[str, Any]]:
        """p50/p99 per `width`-second window from `origin`: tells a steady tail from one
        phase's (connections opening, the job starting or ending)."""
        buckets: dict[int, list[float]] = {}
        for start, latency in zip(self.started, self.latencies, strict=True):
            buckets.setdefault(int((start - origin) // width), []).append(latency)
        out = []
        for index, values in sorted(buckets.items()):
            values.sort()
            out.append(
                {
                    "from_s": index * width,
                    "answered": len(values),
                    "p50_ms": round(1000 * values[len(values) // 2], 1),
                    "p99_ms": round(
                        1000 * values[min(len(values) - 1, len(values) * 99 // 100)], 1
                    ),
                    "max_ms": round(1000 * values[-1], 1),
                }
            )
        return out

    def summary(self, seconds: float | None = None) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        out: dict[str, Any] = {"answered": len(ordered), "errors": dict(self.errors)}
        if self.states:
            out["job_states"] = dict(self.states)
        if seconds:
            out["per_second"] = round(len(ordered) / seconds, 1)
        if ordered:
            out.update(
                {
                    f"p{q}_ms": round(
                        1000 * ordered[min(len(ordered) - 1, len(ordered) * q // 100)], 1
                    )
                    for q in (50, 90, 99)
                }
                | {
                    "max_ms": round(1000 * ordered[-1], 1),
                    "mean_ms": round(1000 * statistics.fmean(ordered), 1),
                }
            )
        return out


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, headers: str
) -> tuple[int, bytes]:
    """One HTTP/1.1 GET on an open keep-alive connection: (status, body)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _client(
    port: int,
    path: str,
    headers: str,
    period: float,
    stop: float,
    tally: Tally,
    keep_alive: bool = True,
    timeout: float = _TIMEOUT,
    track_state: bool = False,
) -> None:
    """Ask `path` every `period` seconds until the clock passes `stop`: a poller keeps its
    connection (reconnecting after a failure), a probe opens a fresh one each time, as an
    orchestrator's does. `track_state` counts the polled job's states, which tells whether
    the job really ran during the measurement."""
    connection = None
    while time.monotonic() < stop:
        started = time.monotonic()
        try:
            if connection is None:
                connection = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), timeout
                )
            status, body = await asyncio.wait_for(_request(*connection, path, headers), timeout)
            if status == 200:
                tally.latencies.append(time.monotonic() - started)
                tally.started.append(started)
                if track_state:
                    tally.states[json.loads(body).get("state", "?")] += 1
            else:
                tally.errors[f"http {status}"] += 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as error:
            tally.errors[type(error).__name__] += 1
            if connection is not None:
                connection[1].close()
            connection = None
        if not keep_alive and connection is not None:
            connection[1].close()
            connection = None
        await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))
    if connection is not None:
        connection[1].close()


def _probe(port: int, path: str, stop: float, tally: Tally) -> Any:
    return _client(port, path, "", 0.5, stop, tally, keep_alive=False, timeout=5)


async def _load(
    port: int, job_path: str, key: str, pollers: int, seconds: float, interval: float, after: float
) -> dict[str, Any]:
    started = time.monotonic()
    stop = started + seconds
    headers = f"Authorization: Bearer {key}\r\n"
    polls = Tally()
    probes = {name: Tally() for name in ("healthz", "readyz")}
    tails = {name: Tally() for name in ("healthz_after", "readyz_after")}
    # pollers start spread over one interval, as clients that opened at different times
    tasks = [
        asyncio.create_task(
            _delayed(
                i * interval / pollers,
                _client(port, job_path, headers, interval, stop, polls, track_state=True),
            )
        )
        for i in range(pollers)
    ]
    tasks += [asyncio.create_task(_probe(port, f"/{name}", stop, probes[name])) for name in probes]
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    end = time.monotonic() + after
    await asyncio.gather(
        *(_probe(port, f"/{name.split('_')[0]}", end, tally) for name, tally in tails.items())
    )
    return {
        "polls": polls.summary(elapsed),
        "polls_by_10s": polls.windows(started),
        **{name: tally.summary() for name, tally in {**probes, **tails}.items()},
    }


async def _delayed(delay: float, work: Any) -> None:
    await asyncio.sleep(delay)
    await work


def seed_job(database_url: str, tenant_name: str) -> str:
    """A queued job of `tenant_name` on a seeded recommender (rows only: nothing runs it)."""
    from sqlalchemy import select

    from fudlr.states import JobState, VersionState
    from service.auth.models import Tenant
    from service.db import make_engine, new_id, session_factory, transaction
    from service.jobs.schemas import JobSpec
    from service.models import File, Job, Recommender, RegisteredModel, Version

    engine = make_engine(database_url)
    digest = "0" * 64
    with transaction(session_factory(engine)) as session:
        tenant = session.scalar(select(Tenant.id).where(Tenant.name == tenant_name))
        base = RegisteredModel(
            id=new_id("bm"), tenant_id=tenant, name="seed", path="/seed", digest=digest, details={}
        )
        adapter = File(
            id=new_id("file"),
            tenant_id=tenant,
            purpose="adapter",
            filename="seed.tgz",
            bytes=1,
            sha256=digest,
            details={"digest": digest},
        )
        rec = Recommender(
            id=new_id("rec"),
            tenant_id=tenant,
            name="seed",
            base_model_id=base.id,
            adapter_file_id=adapter.id,
            data={},
            bundle_digest=digest,
            index_options={},
        )
        version = Version(
            id=new_id("ver"),
            tenant_id=tenant,
            recommender_id=rec.id,
            number=1,
            digest=digest,
            bytes=1,
            state=VersionState.READY,
        )
        spec = JobSpec.model_validate(
            {"biases": [{"side": "item", "attribute": "popularity_group", "metric": "MGU", "k": 5}]}
        )
        job = Job(
            id=new_id("job"),
            tenant_id=tenant,
            recommender_id=rec.id,
            version=1,
            state=JobState.QUEUED,
            spec=spec.model_dump(mode="json"),
        )
        session.add_all([base, adapter])
        session.flush()
        session.add(rec)
        session.flush()
        session.add_all([version, job])
    engine.dispose()
    return job.id


def submit_real_jobs(url: str, key: str, work: Path, count: int = 4) -> list[str]:
    """Register a tiny recommender (random tiny model, briefly trained adapter) through the
    API and submit `count` debias jobs on it, so that the worker runs while the pollers
    poll: one tiny job can end (often `repair_rejected`, the tiny model has no bias to
    repair) within seconds, and the worker runs the others one after another. The default
    is the tenant's quota of unfinished jobs (FUDLR_MAX_TENANT_JOBS)."""
    from clients.sdk import Client
    from fudlr.data.builder import build_movielens_bundle
    from fudlr.data.bundle import Bundle
    from fudlr.data.tiny import make_tiny_movielens
    from fudlr.models.tiny import build_tiny_model
    from fudlr.recommender.train import TrainConfig, train_adapter

    source = make_tiny_movielens(users=24, items=40).write(work / "source")
    bundle_dir = work / "bundle"
    build_movielens_bundle(source, bundle_dir, history_len=5)
    titles = [item.title for item in Bundle.load(bundle_dir, splits=()).items.values()]
    model_dir = work / "models" / "tiny"
    build_tiny_model(model_dir, corpus=titles)
    adapter = work / "adapter"
    train_adapter(
        model_dir,
        Bundle.load(bundle_dir),
        adapter,
        TrainConfig(epochs=1, batch_size=8),
        device="cpu",
    )
    with Client(url, key) as client:
        recommender = client.register("load", model_dir, adapter, bundle_dir)
        client.wait_ready(recommender.id, timeout=600)
        options = {"query_users": 8, "guard_users": 8, "random_control": "off"}
        return [
            client.submit(recommender.id, ["item:popularity_group:MGU@5"], options=options).id
            for _ in range(count)
        ]


def _final_state(url: str, key: str, job_id: str) -> dict[str, Any]:
    """A job after the load (the first is the polled one): still running, or how it ended."""
    import httpx

    body = httpx.get(
        f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ).json()
    return {name: body.get(name) for name in ("id", "state", "stage", "progress", "error")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=1.0, help="each poller's period (s)")
    parser.add_argument("--after", type=float, default=5.0, help="probe this long after (s)")
    parser.add_argument(
        "--database-url",
        default=None,
        help="a PostgreSQL server (a throwaway database is made on it); default: SQLite",
    )
    parser.add_argument("--job", action="store_true", help="a debias job runs meanwhile")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--note", default="", help="conditions worth recording (contention…)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from clients.embedded import create_key, embedded_service
    from tests.integration.harness import free_port, throwaway_database

    port = args.port or free_port()
    database = "postgresql" if args.database_url else "sqlite"
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fudlr-load-")))
        if args.database_url:
            os.environ["FUDLR_DATABASE_URL"] = stack.enter_context(
                throwaway_database(args.database_url)
            )
        service = embedded_service(
            work / "data", port, work / "serve.log", model_roots=[work / "models"]
        )
        with service as env:
            tenant = f"load-{secrets.token_hex(3)}"
            key = create_key(env, tenant)
            if args.job:
                job_ids = submit_real_jobs(env["FUDLR_URL"], key, work)
            else:
                url = os.environ.get("FUDLR_DATABASE_URL")
                job_ids = [seed_job(url or f"sqlite:///{work / 'data' / 'fudlr.db'}", tenant)]
            # this process imported the method and trained the adapter (--job): without a
            # freeze its own full collections pause the pollers' loop for ~150 ms, which
            # the measurement would blame on the server
            gc.collect()
            gc.freeze()
            figures = asyncio.run(
                _load(
                    port,
                    f"/v1/jobs/{job_ids[0]}",
                    key,
                    args.pollers,
                    args.seconds,
                    args.interval,
                    args.after,
                )
            )
            jobs = [_final_state(env["FUDLR_URL"], key, job_id) for job_id in job_ids]
        log_tail = (work / "serve.log").read_text(errors="replace").splitlines()[-20:]
    results = {
        "database": database,
        "pollers": args.pollers,
        "seconds": args.seconds,
        "interval": args.interval,
        "debias_job": args.job,
        **figures,
        "jobs_after": jobs,
        "commit": commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end",
        "note": args.note,
        "server_log_tail": log_tail,
    }
    out = args.out or RESULTS / f"load-{database}-{results['date'][:10]}-{results['commit']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "server_log_tail"}, indent=2))
    print(f"written to {out}")
    return results


if __name__ == "__main__":
    main()
