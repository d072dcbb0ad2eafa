"""Background duties of the API process: send what was committed but not sent, and rescue abandoned work.

- Dispatch: a job (or model inspection) row is committed before its message is sent. If the send fails
  (broker down), `dispatched_at` stays NULL and this loop sends it again later: nothing is lost. A broker can
  also lose what it held (a Redis restarted without persistence): a job still queued `redispatch_after`
  seconds after its message went out is sent again; a duplicate message is dropped by `jobs.claim`.
- Reap: a worker heartbeats its running job. A job whose heartbeat went stale (worker killed, machine gone)
  is re-queued, or failed after `job_max_attempts`; the broker alone does not bring such jobs back.
- Sweep: a process killed mid-upload leaves a partial file in the upload temp folder, and one killed between
  storing a file and committing its row leaves an object no row refers to; both go once `orphan_age` old.
- Queues: a queued job whose queue no worker serves (app.core.presence; say a `cuda` job and no GPU worker) says
  so in its progress message, and fails with `no_worker` once it has waited `queue_timeout` and no worker has
  served its queue for as long.
- Retention: with `artifact_retention_days` set, the outputs of jobs finished longer ago are deleted as by
  DELETE /v1/jobs/{id}, a batch per round.
- Webhooks: due outbox rows are handed to a bounded pool of sending threads (app.core.webhooks.WebhookSender);
  the round itself never waits on a send, and each row is claimed with a lease before it is sent.
Every step is a guarded UPDATE or an idempotent delete, so several API replicas can run this loop side by side.
"""

import logging
import threading
import time
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.api.services import delete_job_outputs
from app.core import jobs, presence, webhooks
from app.core.config import Settings
from app.core.db import session_scope, utcnow
from app.core.dispatch import dispatch_inspection, dispatch_job
from app.core.ids import minted_at
from app.core.statuses import TERMINAL, JobStatus, ModelStatus
from app.core.storage import Storage, StorageError, open_storage
from app.core.storage import keys as storage_keys
from app.core.tables import Artifact, Dataset, Job, Model

log = logging.getLogger(__name__)

EXPIRE_BATCH = 100  # jobs whose outputs expire per round: a long backlog is worked off over several rounds


def dispatch_pending(factory: sessionmaker[Session], celery: Celery, settings: Settings) -> int:
    """Send every queued job and uploaded model whose message is not (or no longer) on the broker."""
    before = utcnow() - timedelta(seconds=settings.dispatch_retry_after)
    resend_before = utcnow() - timedelta(seconds=settings.redispatch_after)
    with session_scope(factory) as session:
        pending_jobs = session.execute(
            select(Job.id, Job.queue).where(Job.status == JobStatus.QUEUED, Job.dispatched_at.is_(None),
                                            Job.updated_at < before).order_by(Job.id).limit(500)).all()
        lost_jobs = session.execute(
            select(Job.id, Job.queue).where(Job.status == JobStatus.QUEUED, Job.dispatched_at < resend_before)
            .order_by(Job.id).limit(500)).all()
        pending_models = session.scalars(
            select(Model.id).where(Model.status == ModelStatus.UPLOADED, Model.dispatched_at.is_(None),
                                   Model.created_at < before).order_by(Model.id).limit(500)).all()
    sent = 0
    for job_id, queue in pending_jobs:
        sent += dispatch_job(factory, celery, job_id, queue)
    for job_id, queue in lost_jobs:
        log.info("job %s is still queued %.0fs after its message was sent; sending it again", job_id,
                 settings.redispatch_after)
        sent += dispatch_job(factory, celery, job_id, queue, sent_before=resend_before)
    for model_id in pending_models:
        sent += dispatch_inspection(factory, celery, model_id)
    return sent


def reap(factory: sessionmaker[Session], settings: Settings) -> dict[str, list[str]]:
    """Rescue running jobs and pending inspections whose worker went away."""
    with session_scope(factory) as session:
        outcome = jobs.reap_stale(session, jobs.stale_cutoff(settings.heartbeat_timeout), settings.job_max_attempts)
        inspect_cutoff = utcnow() - timedelta(seconds=settings.job_time_limit)
        session.execute(update(Model).where(Model.status == ModelStatus.UPLOADED, Model.dispatched_at < inspect_cutoff,
                                            Model.inspect_attempts >= settings.job_max_attempts)
                        .values(status=ModelStatus.INVALID, error="inspection did not finish; the worker kept failing")
                        .execution_options(synchronize_session=False))
        session.execute(update(Model).where(Model.status == ModelStatus.UPLOADED, Model.dispatched_at < inspect_cutoff)
                        .values(dispatched_at=None).execution_options(synchronize_session=False))
    for kind, ids in outcome.items():
        if ids:
            log.warning("reaper %s jobs: %s", kind, ", ".join(ids))
    return outcome


def watch_queues(factory: sessionmaker[Session], settings: Settings, may_fail: bool) -> list[str]:
    """Note on queued jobs whether a worker serves their queue; with `may_fail`, fail those that waited
    `queue_timeout` on a queue no worker has served for as long. Returns the ids failed."""
    now = utcnow()
    failed: list[str] = []
    with session_scope(factory) as session:
        served = presence.last_served(session)
        jobs.note_waiting(session, presence.unserved(served, now - timedelta(seconds=settings.heartbeat_timeout)))
        if may_fail:
            waited = timedelta(seconds=max(settings.queue_timeout, settings.heartbeat_timeout))
            for queue in presence.unserved(served, now - waited):
                failed += jobs.fail_unserved(session, queue, now - timedelta(seconds=settings.queue_timeout),
                                             settings.queue_timeout)
    if failed:
        log.warning("no worker serves their queue; failed jobs: %s", ", ".join(failed))
    return failed


def expire_outputs(factory: sessionmaker[Session], storage: Storage, settings: Settings) -> list[str]:
    """Delete the outputs of up to EXPIRE_BATCH jobs finished more than `artifact_retention_days` ago (oldest
    first); returns their ids. A storage failure ends the round: the rest wait for the next."""
    if settings.artifact_retention_days is None:
        return []
    cutoff = utcnow() - timedelta(days=settings.artifact_retention_days)
    with factory() as session:
        expired = session.scalars(
            select(Job).where(Job.status.in_(TERMINAL), Job.deleted_at.is_(None), Job.finished_at < cutoff)
            .order_by(Job.finished_at).limit(EXPIRE_BATCH)).all()
        done = []
        for job in expired:
            try:
                delete_job_outputs(session, storage, job)
            except StorageError as exc:
                log.warning("could not delete the expired outputs of job %s: %s", job.id, exc)
                break
            session.commit()
            done.append(job.id)
    if done:
        log.info("deleted the outputs of %d job(s) past the retention period: %s", len(done), ", ".join(done))
    return done


def _orphan_keys(session: Session, keys: list[str], cutoff: datetime) -> list[str]:
    """Keys under `tenants/<tenant>/<models|datasets|jobs>/<id>/` that no row refers to and that are older than
    `cutoff`. Age is the owner's: its id's time, or a finished job's end (a running job is still storing its
    outputs, before its artifact rows exist). Keys of any other shape are never touched."""
    owned: dict[str, list[tuple[str, str]]] = {kind: [] for kind in storage_keys.OWNER_KINDS}
    for key in keys:
        if (owner := storage_keys.owner_of(key)) is not None:
            owned[owner.kind].append((owner.id, key))
    referenced: set[str] = set()
    ages: dict[str, datetime | None] = {}
    for kind, table in (("models", Model), ("datasets", Dataset)):
        ids = sorted({owner for owner, _ in owned[kind]})
        referenced.update(session.scalars(select(table.storage_key).where(table.id.in_(ids))))
        ages.update((owner, minted_at(owner)) for owner in ids)
    job_ids = sorted({owner for owner, _ in owned["jobs"]})
    referenced.update(session.scalars(select(Artifact.storage_key).where(Artifact.job_id.in_(job_ids))))
    ages.update((owner, minted_at(owner)) for owner in job_ids)
    for job_id, status, finished_at in session.execute(
            select(Job.id, Job.status, Job.finished_at).where(Job.id.in_(job_ids))):
        ages[job_id] = finished_at if JobStatus(status).is_terminal() else None
    return [key for kind in owned.values() for owner, key in kind
            if key not in referenced and ages[owner] is not None and ages[owner] < cutoff]


def sweep_orphans(factory: sessionmaker[Session], storage: Storage, settings: Settings) -> int:
    """Remove partial upload files and unreferenced storage objects older than `orphan_age`; returns how many."""
    cutoff = utcnow() - timedelta(seconds=settings.orphan_age)
    removed = 0
    tmp = settings.upload_tmp_dir()
    for path in tmp.iterdir() if tmp.is_dir() else []:
        try:
            if path.is_file() and path.stat().st_mtime < cutoff.timestamp():
                path.unlink()
                removed += 1
        except FileNotFoundError:  # its upload finished and removed it meanwhile
            pass
    keys = storage.list_keys("tenants")
    orphans: list[str] = []
    with factory() as session:
        for start in range(0, len(keys), 1000):  # bounded IN lists, whatever the size of the store
            orphans += _orphan_keys(session, keys[start:start + 1000], cutoff)
    for key in orphans:
        storage.delete(key)
    if removed or orphans:
        log.warning("housekeeping removed %d partial upload(s) and %d unreferenced object(s): %s", removed,
                    len(orphans), ", ".join(orphans))
    return removed + len(orphans)


class Housekeeper:
    """Runs webhooks + reap + dispatch + queues + retention every `dispatch_interval` seconds on a daemon thread,
    and the sweep every quarter of `orphan_age` (listing the whole store is too costly for every round).

    Workers cannot heartbeat while the database is down, so after an outage (and at start) the reaper and the
    `no_worker` check wait until the database has answered for `heartbeat_timeout`: a restart of the database
    must not re-queue, and so run twice, every job that was running through it, nor fail queued jobs because no
    worker could say it was there.
    """

    def __init__(self, factory: sessionmaker[Session], celery: Celery, settings: Settings):
        self.factory, self.celery, self.settings = factory, celery, settings
        self.storage = open_storage(settings.resolved_storage_url())
        self.webhooks = webhooks.WebhookSender(factory, settings)
        self._next_sweep = 0.0
        self._reachable_since: float | None = None  # monotonic time since when the database has answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="housekeeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.webhooks.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.dispatch_interval):
            try:
                self._round()
            except DBAPIError as exc:
                self._reachable_since = None
                log.warning("housekeeping round failed, the database is unavailable: %s", exc)
            except Exception as exc:  # broker or storage down: try again next round
                log.warning("housekeeping round failed: %s", exc)

    def send_webhooks(self) -> list:
        """Start sending the due webhook events (returns the pool's tasks; nothing here waits for them). A failure
        is logged and never keeps the rest of the round (reap, dispatch) from running."""
        try:
            return self.webhooks.send_round()
        except Exception as exc:
            log.warning("webhook round failed: %s", exc)
            return []

    def _round(self) -> None:
        self.send_webhooks()
        now = time.monotonic()
        settled = self._reachable_since is not None and now - self._reachable_since >= self.settings.heartbeat_timeout
        if settled:
            reap(self.factory, self.settings)
        dispatch_pending(self.factory, self.celery, self.settings)
        watch_queues(self.factory, self.settings, may_fail=settled)
        expire_outputs(self.factory, self.storage, self.settings)
        if self._reachable_since is None:
            self._reachable_since = now
        if now >= self._next_sweep:
            sweep_orphans(self.factory, self.storage, self.settings)
            self._next_sweep = now + self.settings.orphan_age / 4
