"""The service's commands: run it (`serve`, `worker`, `db`, `keys`) and use it (`register`,
`submit`, `status`, `wait`, `cancel`, `download`, `usage`, `files delete`,
`recommenders delete`).

Running commands read `FUDLR_*` settings (service/settings.py); using commands talk to
`FUDLR_URL` with `FUDLR_API_KEY` through the SDK. The web stack and Celery are imported
inside the commands, so `fudlr --help` stays fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from fudlr.console import console
from fudlr.errors import FudlrError
from fudlr.repair.config import SETTINGS
from fudlr.setting import option as setting_option

if TYPE_CHECKING:
    from clients.models import JobOut
    from clients.sdk import Client

info = Console(stderr=True, highlight=False)  # chatter; stdout carries ids, keys and tables
keys_app = typer.Typer(help="API keys (run where the service's database is reachable).")
db_app = typer.Typer(help="The service's database schema.")
files_app = typer.Typer(help="Uploaded files.")
recommenders_app = typer.Typer(help="Registered recommenders.")


def _client() -> Client:
    from clients.sdk import Client

    return Client()


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    worker: bool = typer.Option(
        True, help="Also start a worker (the embedded default: one command, no other service)."
    ),
    log_level: str = typer.Option("info", help="uvicorn and worker log level."),
) -> None:
    """Run the HTTP API and, by default, a worker (the embedded mode).

    Settings come from FUDLR_* variables: SQLite, a local artifact folder and a filesystem
    broker unless FUDLR_DATABASE_URL / FUDLR_BROKER_URL say otherwise.
    """
    import uvicorn

    from service.app import create_app
    from service.db import make_engine, migrate
    from service.settings import Settings

    settings = Settings()
    migrate(make_engine(settings.db_url))  # before the worker can touch the tables
    info.print(
        f"FUDLR API on http://{host}:{port} (docs: /docs)  database: {_redacted(settings.db_url)}"
        f"  broker: {_redacted(settings.broker)}  artifacts: {settings.artifacts}"
    )
    child = None
    if worker:
        command = [sys.executable, "-m", "clients.cli", "worker", "--log-level", log_level]
        child = subprocess.Popen(command)
    # uvicorn re-raises SIGTERM once it has shut down; exit through `finally` instead of dying
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
    finally:
        if child is not None:
            child.send_signal(signal.SIGTERM)  # warm shutdown: the running task finishes
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


def worker(
    concurrency: int = typer.Option(1, min=1, help="Tasks run at once (one per GPU)."),
    pool: str = typer.Option(
        "prefork",
        help="prefork: each task in a fresh child process (CUDA state never leaks between "
        "tasks); solo: in this process.",
    ),
    log_level: str = typer.Option("info", help="Log level."),
) -> None:
    """Run a worker on the FUDLR_QUEUE queue (many workers on many machines share one)."""
    from service.settings import Settings
    from workers.app import create_worker_app

    settings = Settings()
    if pool not in ("prefork", "solo", "threads"):
        raise FudlrError(f"unknown pool '{pool}' (use prefork, solo or threads)")
    argv = [
        "worker",
        "--queues",
        settings.queue,
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--loglevel",
        log_level.upper(),
        "--hostname",
        f"fudlr-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    if pool == "prefork":
        argv += ["--max-tasks-per-child", "1"]
    # below the API on a shared machine; prefork children inherit it
    os.nice(settings.worker_nice)
    create_worker_app(settings).worker_main(argv)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the migrations to FUDLR_DATABASE_URL (the API also does this when it starts)."""
    from service.db import make_engine, migrate
    from service.settings import Settings

    settings = Settings()
    migrate(make_engine(settings.db_url))
    info.print(f"schema up to date: {_redacted(settings.db_url)}")


@keys_app.command("create")
def keys_create(tenant: str = typer.Option(..., help="Tenant name (created if new).")) -> None:
    """Print a new API key for the tenant; only its hash is stored, so keep it now."""
    from service.auth.service import create_key
    from service.db import make_engine, migrate, session_factory, transaction
    from service.settings import Settings

    engine = make_engine(Settings().db_url)
    migrate(engine)
    with transaction(session_factory(engine)) as session:
        record, key = create_key(session, tenant)[1:]
    info.print(f"key {record.id} for tenant '{tenant}' (shown once):")
    typer.echo(key)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (key_…).")) -> None:
    """Revoke a key: requests with it answer 401 from now on."""
    from service.auth.service import revoke_key
    from service.db import make_engine, session_factory, transaction
    from service.settings import Settings

    with transaction(session_factory(make_engine(Settings().db_url))) as session:
        if not revoke_key(session, key_id):
            raise FudlrError(f"no active key '{key_id}'")
    info.print(f"revoked {key_id}")


def register(
    name: str = typer.Option(..., help="Name of the recommender."),
    base_model: str = typer.Option(
        ..., help="A registered base model id (bm_…), or a model directory to register."
    ),
    adapter: Path = typer.Option(..., help="PEFT adapter directory, or a .tar.gz/.zip of it."),
    bundle: Path = typer.Option(..., help="The bundle the adapter was trained on."),
    index_option: list[str] = typer.Option(
        [],
        help="Index option KEY=VALUE (curvature_samples, precision, kind, ...); repeatable.",
    ),
    decoding: str = typer.Option(
        None, help="How jobs decode its lists: constrained (default) or grounded (BIGRec)."
    ),
    wait: bool = typer.Option(False, help="Wait until the training-set index is built."),
) -> None:
    """Upload an adapter and its training data and register them as a recommender."""
    with _client() as client:
        recommender = client.register(
            name, base_model, adapter, bundle, _options(index_option), decoding
        )
        info.print(f"recommender {recommender.id}: version 1, {recommender.state}")
        if wait:
            with info.status(f"indexing {recommender.id}"):
                client.wait_ready(recommender.id)
            info.print(f"recommender {recommender.id}: ready")
    typer.echo(recommender.id)


def _budget(name: str) -> Any:
    """A budget flag: unset unless given, so that the server's default applies."""
    return setting_option(SETTINGS[name], server_default=True)


def submit(
    ctx: typer.Context,
    recommender: str = typer.Argument(..., help="Recommender id (rec_…)."),
    bias: list[str] = typer.Option(
        ..., help="SIDE:ATTRIBUTE:METRIC@K[*WEIGHT], e.g. item:popularity_group:MGU@5; repeatable."
    ),
    version: int = typer.Option(None, help="Version to repair (default: the latest)."),
    max_fraction: float = _budget("max_fraction"),
    max_loss_increase: float = _budget("max_loss_increase"),
    max_ndcg_drop: float = _budget("max_ndcg_drop"),
    accuracy_k: int = _budget("accuracy_k"),
    eligibility: str = _budget("eligibility"),
    fdr: float = _budget("fdr"),
    guard_confidence: float = _budget("guard_confidence"),
    max_upweight: float = _budget("max_upweight"),
    max_other_k_increase: float = _budget("max_other_k_increase"),
    option: list[str] = typer.Option(
        [], help="Job option KEY=VALUE (query_users, guard_users, num_beams, ...); repeatable."
    ),
    drop_unmeasurable: bool = setting_option(SETTINGS["drop_unmeasurable"], "--drop-unmeasurable"),
    idempotency_key: str = typer.Option(None, help="Resubmitting with it returns the same job."),
    wait: bool = typer.Option(False, help="Wait for the job, with a progress bar."),
) -> None:
    """Submit a debias job; prints its id."""
    # the setting flags given are the job's budget, but drop_unmeasurable: an option
    budget = {
        name: value
        for name, value in ctx.params.items()
        if name in SETTINGS and value is not None and name != "drop_unmeasurable"
    }
    options = _options(option)
    if drop_unmeasurable:
        options["drop_unmeasurable"] = True
    with _client() as client:
        job = client.submit(recommender, bias, version, budget, options, idempotency_key)
        info.print(f"job {job.id}: {job.state} (version {job.version}, {', '.join(job.biases)})")
        if wait:
            _finish(client, client.wait(job.id))
    typer.echo(job.id)


def status(job: str = typer.Argument(..., help="Job id (job_…).")) -> None:
    """Show a job: state, stage, progress, metrics before / predicted / after."""
    with _client() as client:
        console.print(job_table(client.job(job)))


def wait(
    job: str = typer.Argument(..., help="Job id (job_…)."),
    poll: float = typer.Option(1.0, min=0.1, help="Seconds between polls."),
    timeout: float = typer.Option(None, help="Give up after this many seconds."),
) -> None:
    """Follow a job to its end with a progress bar and its events; fails unless it succeeded."""
    with _client() as client:
        _finish(client, client.wait(job, poll=poll, timeout=timeout))


def cancel(job: str = typer.Argument(..., help="Job id (job_…).")) -> None:
    """Cancel a job (a running one stops at its next batch)."""
    with _client() as client:
        console.print(f"job {job}: {client.cancel(job).state}")


def download(
    recommender: str = typer.Argument(..., help="Recommender id (rec_…)."),
    out: Path = typer.Option(..., help="Folder to unpack the PEFT adapter into."),
    version: int = typer.Option(None, help="Version (default: the latest)."),
    archive: bool = typer.Option(False, help="Save the .tar.gz as OUT instead of unpacking."),
) -> None:
    """Download a version's adapter (checked against its sha256)."""
    with _client() as client:
        number = version or client.recommender(recommender).latest_version
        path = client.download(recommender, number, out, extract=not archive)
    console.print(f"{recommender} v{number} -> {path}")


def usage() -> None:
    """Show what the tenant stores and runs, against its quotas."""
    with _client() as client:
        current = client.usage()
    table = Table(title="usage", show_header=False)
    share = current.bytes_stored / current.max_bytes
    table.add_row(
        "stored", f"{_size(current.bytes_stored)} of {_size(current.max_bytes)} ({share:.1%})"
    )
    table.add_row("unfinished jobs", f"{current.active_jobs} of {current.max_jobs}")
    console.print(table)


@files_app.command("delete")
def files_delete(file: str = typer.Argument(..., help="File id (file_…).")) -> None:
    """Delete an uploaded file (refused while a recommender uses it)."""
    with _client() as client:
        client.delete_file(file)
    info.print(f"deleted {file}")


@recommenders_app.command("delete")
def recommenders_delete(
    recommender: str = typer.Argument(..., help="Recommender id (rec_…)."),
) -> None:
    """Delete a recommender with its versions, indexes and finished jobs (refused while a
    job of it is unfinished); its uploaded files stay."""
    with _client() as client:
        client.delete_recommender(recommender)
    info.print(f"deleted {recommender}")


def _size(count: int) -> str:
    """Bytes in binary units, for people."""
    value, unit = float(count), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"


def _finish(client: Client, job: JobOut) -> None:
    from fudlr.repair.cli import guard_notes, result_table

    report = client.report(job.id)
    console.print(result_table(report))
    for line in guard_notes(report):
        console.print(line)
    console.print(f"job {job.id} succeeded: version {job.result_version}")


def job_table(job: JobOut) -> Table:
    table = Table(title=f"job {job.id}", show_header=False)
    progress = f"{job.progress:.0%}" if job.progress is not None else "-"
    rows: list[tuple[str, Any]] = [
        ("recommender", f"{job.recommender_id} v{job.version}"),
        ("biases", ", ".join(job.biases)),
        ("state", job.state),
        ("stage", f"{job.stage or '-'} ({progress})"),
        ("attempts", job.attempts),
        ("result version", job.result_version or "-"),
        ("error", f"{job.error.code}: {job.error.detail}" if job.error else "-"),
        ("created", f"{job.created_at:%Y-%m-%d %H:%M:%S %Z}"),
        ("finished", f"{job.finished_at:%Y-%m-%d %H:%M:%S %Z}" if job.finished_at else "-"),
    ]
    metrics = job.metrics
    for label in job.biases:
        if metrics.before and metrics.after and metrics.predicted:
            rows.append(
                (
                    label,
                    f"{metrics.before['biases'][label]:.4f} -> "
                    f"{metrics.after['biases'][label]:.4f} (surrogate predicted "
                    f"{metrics.predicted[f'{label}:before']:.4f} -> "
                    f"{metrics.predicted[f'{label}:after']:.4f})",
                )
            )
    if metrics.accuracy:
        from fudlr.repair.guard import AccuracyCheck

        rows.append(("accuracy", AccuracyCheck(**metrics.accuracy).explain()))
    for entry in metrics.dropped_biases or []:
        rows.append((f"dropped {entry['bias']}", entry["reason"]))
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def _options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values parse as JSON where they can (numbers, lists, null)."""
    import json

    options: dict[str, Any] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise FudlrError(f"bad option '{pair}': expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _redacted(url: str) -> str:
    """A URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    if url.startswith("filesystem://"):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def add_to(app: typer.Typer) -> None:
    """Hang the service's commands on the `fudlr` app."""
    for command in (serve, worker, register, submit, status, wait, cancel, download, usage):
        app.command(command.__name__)(command)
    app.add_typer(files_app, name="files")
    app.add_typer(recommenders_app, name="recommenders")
    app.add_typer(keys_app, name="keys")
    app.add_typer(db_app, name="db")
