"""What a task does: claim the row, run the method under its lease, publish or fail cleanly.

Both tasks share one frame (`_leased`): a claim that only one delivery wins, a
heartbeat, the method's errors turned into a failed row with a reason, and nothing
written once the lease is lost. The method (torch, CUDA) is imported inside the work.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from fudlr.control import Cancelled
from fudlr.errors import FudlrError, InputError
from fudlr.states import JobState, VersionState
from service.auth.models import Tenant
from service.db import Leased, make_engine, new_id, session_factory, transaction
from service.files.archives import pack
from service.jobs.schemas import JobSpec
from service.models import Job, Recommender, RegisteredModel, Version
from service.queue import TaskQueue
from service.settings import Settings
from service.storage import Storage, TenantStore
from workers.leases import Lease

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)
_PUBLISH_TRIES = 5


class Runtime:
    """A worker process's connections, built on first use (after the pool forked)."""

    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings, self.celery = settings, celery

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return session_factory(make_engine(self.settings.db_url))

    @cached_property
    def storage(self) -> Storage:
        return Storage(self.settings.artifacts)

    @cached_property
    def queue(self) -> TaskQueue:
        return TaskQueue(self.celery, self.settings.queue)

    def index_version(self, version_id: str) -> None:
        self._leased(Version, version_id, self._index)

    def run_job(self, job_id: str) -> None:
        self._leased(Job, job_id, self._debias)

    def _leased(self, model: type[Leased], subject_id: str, work: Callable[[Lease], None]) -> None:
        lease = Lease.claim(self.sessions, model, subject_id, self.settings)
        if lease is None:
            log.info(
                "%s %s is not waiting (done, taken or cancelled): skipped",
                model.__name__,
                subject_id,
            )
            return
        with lease.heartbeat():
            try:
                work(lease)
            except Cancelled as error:
                self._end(lease, JobState.CANCELLED, str(error))
            except FudlrError as error:
                problem = _error(error)
                # a rejected repair keeps its report: what was selected, every guard attempt
                found = getattr(error, "report", None)
                extra = {"report": found} if found is not None else {}
                if found and found.get("dropped_biases"):
                    extra["metrics"] = {"dropped_biases": found["dropped_biases"]}
                failed = f"failed: {problem['detail']}"
                self._end(lease, model.FAILED, failed, error=problem, **extra)
            except Exception as error:
                log.exception("%s %s crashed", model.__name__, subject_id)
                problem = {"code": "internal_error", "detail": f"{type(error).__name__}: {error}"}
                self._end(lease, model.FAILED, f"failed: {problem['detail']}", error=problem)

    def _end(self, lease: Lease, state: str, message: str, **values: Any) -> None:
        """End the row as `state`; a job whose cancellation was requested meanwhile ends
        `cancelled` whatever stopped it (the user asked for it, nothing was published)."""
        if lease.lost:
            log.warning("lease on %s was lost; leaving the row to its new owner", lease.id)
            return
        with transaction(self.sessions) as session:
            if state != JobState.CANCELLED:
                running = (lease.model.RUNNING,)
                if lease.finish(session, state, message, only_from=running, **values):
                    return
                message = f"cancelled (it had {message})"
            lease.finish(session, JobState.CANCELLED, message, only_from=(JobState.CANCELLING,))

    def _base_model(self, session: Session, model_id: str) -> Path:
        """The registered directory, refused if its weights changed since registration."""
        from fudlr.models.store import weights_digest

        base = session.get_one(RegisteredModel, model_id)
        path = Path(base.path)
        if weights_digest(path) != base.digest:
            raise InputError(
                f"the weights of base model '{base.id}' changed since it was registered"
            )
        return path

    def _index(self, lease: Lease) -> None:
        from fudlr.data.bundle import Bundle
        from fudlr.influence.index import IndexConfig, build_index

        with self.sessions() as session:
            version = session.get_one(Version, lease.id)
            recommender = session.get_one(Recommender, version.recommender_id)
            base_dir = self._base_model(session, recommender.base_model_id)
        store = self.storage.tenant(version.tenant_id)
        config = IndexConfig(**recommender.index_options)
        adapter = store.adapter(version.digest)
        if _built(store.index(version.id), base_dir, adapter, config):
            # an earlier attempt finished the index but was lost before it said so
            self._end(
                lease, VersionState.READY, "ready: the index an earlier attempt built", stage=None
            )
            return
        bundle = Bundle.load(store.bundle(recommender.bundle_digest), splits=("train",))
        build_index(
            base_dir,
            adapter,
            bundle,
            store.index(version.id),
            config,
            device=self.settings.device,
            control=lease.control(),
        )
        built = "ready: training-set index built"
        self._end(lease, VersionState.READY, built, stage=None, progress=None)

    def _debias(self, lease: Lease) -> None:
        from fudlr.data.bundle import Bundle
        from fudlr.data.schema import SPLITS
        from fudlr.repair.pipeline import DebiasJob

        with self.sessions() as session:
            job = session.get_one(Job, lease.id)
            recommender = session.get_one(Recommender, job.recommender_id)
            version = session.scalars(
                select(Version).where(
                    Version.recommender_id == recommender.id, Version.number == job.version
                )
            ).one()
            base_dir = self._base_model(session, recommender.base_model_id)
        if version.state != VersionState.READY:
            raise InputError(
                f"version {version.number} has no training-set index ({version.state})"
            )
        store = self.storage.tenant(job.tenant_id)
        config = JobSpec.model_validate(job.spec).to_config()
        store.clear_scratch(job.id)  # an earlier attempt's, if its worker was killed
        work = store.work(f"{job.id}-{lease.attempt}")
        work.mkdir(parents=True)
        try:
            splits = tuple(split for split in SPLITS if split in recommender.data)
            bundle = Bundle.load(store.bundle(recommender.bundle_digest), splits=splits)
            report = DebiasJob(
                base_dir,
                store.adapter(version.digest),
                bundle,
                store.index(version.id),
                config,
                self.settings.device,
                lease.control(),
                measurements=store.measurements(version.id),
            ).run(work)
            self._publish(lease, job, version, store, work / "adapter", report)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _publish(
        self,
        lease: Lease,
        job: Job,
        parent: Version,
        store: TenantStore,
        adapter: Path,
        report: dict,
    ) -> None:
        """Pack the repaired adapter; then in one transaction, under the tenant's lock (a
        deletion must not remove content a new version is about to hold), store it by
        content, end the job and add the next version (a version's `job_id` is unique: one
        job, one version)."""
        metrics = {
            "before": report["metrics"]["valid"]["before"],
            "predicted": report["predicted"],
            "after": report["metrics"]["valid"]["after"],
            "test": report["metrics"].get("test"),
            "accuracy": report["accuracy"],
            "dropped_biases": report["dropped_biases"],
        }
        with store.staging() as staging:
            archive = staging / "adapter.tar.gz"
            digest = pack(adapter, archive)
            staged = StagedAdapter(store, [archive, adapter], digest, archive.stat().st_size)
            for _ in range(_PUBLISH_TRIES):
                try:
                    new_version = self._publish_once(lease, job, parent, staged, metrics, report)
                    break
                except IntegrityError:  # another job took the next number: take the one after
                    continue
            else:
                raise FudlrError("could not allocate a version number")
        if new_version is not None:
            self.queue.send(self.sessions, Version, new_version)

    def _publish_once(
        self,
        lease: Lease,
        job: Job,
        parent: Version,
        staged: StagedAdapter,
        metrics: dict,
        report: dict,
    ) -> str | None:
        with transaction(self.sessions) as session:
            Tenant.lock(session, job.tenant_id)
            number = 1 + session.scalar(
                select(func.max(Version.number)).where(Version.recommender_id == job.recommender_id)
            )
            ended = lease.finish(
                session,
                JobState.SUCCEEDED,
                f"succeeded: version {number} published",
                only_from=(Job.RUNNING,),
                metrics=metrics,
                report=report,
                result_version=number,
                stage=None,
                progress=None,
            )
            if not ended:  # cancelled meanwhile (or lost): publish nothing
                version = None
            else:
                staged.put()
                version = Version(
                    id=new_id("ver"),
                    tenant_id=job.tenant_id,
                    recommender_id=job.recommender_id,
                    number=number,
                    parent_number=parent.number,
                    job_id=job.id,
                    digest=staged.digest,
                    bytes=staged.bytes,
                    state=Version.PENDING,
                )
                session.add(version)
        if version is None:
            self._end(lease, JobState.CANCELLED, "cancelled: the finished result was discarded")
            return None
        return version.id


@dataclass
class StagedAdapter:
    """A repaired adapter staged for publication: its archive and folder, in the order of
    `TenantStore.content`, moved into the store by `put` (a retry finds them there)."""

    store: TenantStore
    staged: list[Path]
    digest: str
    bytes: int

    def put(self) -> None:
        for source, target in zip(self.staged, self.store.content(self.digest), strict=True):
            self.store.put(source, target)


def _built(index: Path, base_dir: Path, adapter: Path, config: Any) -> bool:
    """Whether `index` is complete (indexes are renamed into place whole) and was built from
    this base model, adapter and configuration."""
    from dataclasses import asdict

    from fudlr.influence.index import FORMAT, MANIFEST, adapter_weights_digest
    from fudlr.models.store import model_digest

    try:
        manifest = json.loads((index / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("format") == FORMAT
        and manifest.get("config") == json.loads(json.dumps(asdict(config)))
        and manifest.get("adapter_digest") == adapter_weights_digest(adapter)
        and manifest.get("base_model_digest") == model_digest(base_dir)
    )


def _error(error: FudlrError) -> dict[str, Any]:
    """A failed row's `error`: a stable code, the reason, where (file name only)."""
    from fudlr.repair.config import UnmeasurableBias
    from fudlr.repair.pipeline import RepairRejected

    if isinstance(error, RepairRejected):
        return {"code": "repair_rejected", "detail": str(error)}
    if isinstance(error, UnmeasurableBias):
        return {
            "code": "unmeasurable_bias",
            "detail": error.reason,
            "field": f"biases.{error.position}",
        }
    if isinstance(error, InputError):
        where = {
            "file": Path(error.file).name if error.file else None,
            "line": error.line,
            "field": error.field,
        }
        located = {key: value for key, value in where.items() if value is not None}
        return {"code": "invalid_input", "detail": error.reason, **located}
    return {"code": "failed", "detail": str(error)}
