"""Background duties of the API process: send what was committed but not sent, and rescue abandoned work.

- Dispatch: a job (or model inspection) row is committed before its message is sent. If the send fails
  (broker down), `dispatched_at` stays NULL and this loop sends it again later: nothing is lost.
- Reap: a worker heartbeats its running job. A job whose heartbeat went stale (worker killed, machine gone)
  is re-queued, or failed after `job_max_attempts`; the broker alone does not bring such jobs back.
Every step is a guarded UPDATE, so several API replicas can run this loop side by side.
"""

import logging
import threading
from datetime import timedelta

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app import jobs
from app.config import Settings
from app.db import session_scope, utcnow
from app.models import Job, Model
from app.queue import send_inspection, send_job

log = logging.getLogger(__name__)


def _mark_dispatched(factory: sessionmaker[Session], table, row_id: str) -> bool:
    with session_scope(factory) as session:
        result = session.execute(update(table).where(table.id == row_id, table.dispatched_at.is_(None))
                                 .values(dispatched_at=utcnow()).execution_options(synchronize_session=False))
        return result.rowcount == 1


def _unmark_dispatched(factory: sessionmaker[Session], table, row_id: str) -> None:
    with session_scope(factory) as session:
        session.execute(update(table).where(table.id == row_id).values(dispatched_at=None)
                        .execution_options(synchronize_session=False))


def dispatch_job(factory: sessionmaker[Session], celery: Celery, job_id: str, queue: str) -> bool:
    """Send "run job X" once; on a broker failure leave the job queued and undispatched for a later retry."""
    if not _mark_dispatched(factory, Job, job_id):
        return False
    try:
        send_job(celery, job_id, queue)
        return True
    except Exception as exc:  # any broker/transport failure: retried by the loop
        log.warning("could not send job %s to the broker (%s); it stays queued and will be re-sent", job_id, exc)
        _unmark_dispatched(factory, Job, job_id)
        return False


def dispatch_inspection(factory: sessionmaker[Session], celery: Celery, model_id: str) -> bool:
    if not _mark_dispatched(factory, Model, model_id):
        return False
    try:
        send_inspection(celery, model_id)
        return True
    except Exception as exc:
        log.warning("could not send inspection of %s (%s); will retry", model_id, exc)
        _unmark_dispatched(factory, Model, model_id)
        return False


def dispatch_pending(factory: sessionmaker[Session], celery: Celery, settings: Settings) -> int:
    """Send every queued job and uploaded model whose message is not (or no longer) on the broker."""
    before = utcnow() - timedelta(seconds=settings.dispatch_retry_after)
    with session_scope(factory) as session:
        pending_jobs = session.execute(
            select(Job.id, Job.queue).where(Job.status == jobs.JobStatus.QUEUED, Job.dispatched_at.is_(None),
                                            Job.updated_at < before).order_by(Job.id).limit(500)).all()
        pending_models = session.scalars(
            select(Model.id).where(Model.status == "uploaded", Model.dispatched_at.is_(None),
                                   Model.created_at < before).order_by(Model.id).limit(500)).all()
    sent = 0
    for job_id, queue in pending_jobs:
        sent += dispatch_job(factory, celery, job_id, queue)
    for model_id in pending_models:
        sent += dispatch_inspection(factory, celery, model_id)
    return sent


def reap(factory: sessionmaker[Session], settings: Settings) -> dict[str, list[str]]:
    """Rescue running jobs and pending inspections whose worker went away."""
    with session_scope(factory) as session:
        outcome = jobs.reap_stale(session, jobs.stale_cutoff(settings.heartbeat_timeout), settings.job_max_attempts)
        inspect_cutoff = utcnow() - timedelta(seconds=settings.job_time_limit)
        session.execute(update(Model).where(Model.status == "uploaded", Model.dispatched_at < inspect_cutoff,
                                            Model.inspect_attempts >= settings.job_max_attempts)
                        .values(status="invalid", error="inspection did not finish; the worker kept failing")
                        .execution_options(synchronize_session=False))
        session.execute(update(Model).where(Model.status == "uploaded", Model.dispatched_at < inspect_cutoff)
                        .values(dispatched_at=None).execution_options(synchronize_session=False))
    for kind, ids in outcome.items():
        if ids:
            log.warning("reaper %s jobs: %s", kind, ", ".join(ids))
    return outcome


class Housekeeper:
    """Runs reap + dispatch every `dispatch_interval` seconds on a daemon thread."""

    def __init__(self, factory: sessionmaker[Session], celery: Celery, settings: Settings):
        self.factory, self.celery, self.settings = factory, celery, settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="housekeeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.dispatch_interval):
            try:
                reap(self.factory, self.settings)
                dispatch_pending(self.factory, self.celery, self.settings)
            except Exception as exc:  # database or broker down: try again next round
                log.warning("housekeeping round failed: %s", exc)
