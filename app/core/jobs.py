"""The job state machine. Every status change of a job goes through this module, as a guarded UPDATE.

queued -> running -> succeeded | failed | cancelled, plus:
  queued -> cancelled            (cancelled before a worker took it)
  running -> queued              (worker died: the reaper re-queues it, up to job_max_attempts)
  running -> running             (a re-delivered message takes over a job whose heartbeat went stale)
  queued -> failed               (no worker served its queue for `queue_timeout`: `no_worker`)
A terminal job never changes status again; its outputs may later be deleted (`deleted_at`), never restored.
Guards live in the WHERE clauses, so two processes racing on one job cannot both win. Every move to a terminal
state also puts the job's webhook event (if it has a webhook_url) in the outbox, in the same transaction
(app.core.webhooks).

A running tune job may hold one provisional artifact, its best trial so far (`record_provisional`); `finish`
replaces it with the final artifacts, and a job the reaper ends keeps it as a final one.

Each change, and each progress report worth it, is a row of the job's history (app.core.job_events), inserted
after the transaction's guarded UPDATE of the job: that row lock makes one job's events commit in id order.
"""

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app.core import webhooks
from app.core.db import utcnow
from app.core.errors import ErrorCode
from app.core.ids import new_id
from app.core.job_events import EventKind, status_snapshot
from app.core.statuses import TERMINAL, JobStatus
from app.core.tables import Artifact, Job, JobEvent


def _record(session: Session, job_id: str, from_status: str | None, to_status: str, message: str | None = None) -> None:
    session.add(JobEvent(job_id=job_id, kind=EventKind.STATUS, from_status=from_status, to_status=to_status,
                         message=message, data=status_snapshot(session, job_id)))


def create_job(session: Session, **fields: Any) -> Job:
    job = Job(id=new_id("job"), status=JobStatus.QUEUED, **fields)
    session.add(job)
    session.flush()
    _record(session, job.id, None, JobStatus.QUEUED)
    return job


def claim(session: Session, job_id: str, worker_id: str, stale_before: datetime) -> Job | None:
    """Take a queued job (or a running one whose worker stopped heartbeating) for this worker.

    Returns None when the job is not ours to run: finished, cancelled, or alive on another worker.
    """
    now = utcnow()
    job = session.get(Job, job_id)
    if job is None:
        return None
    previous = job.status
    result = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .where(or_(Job.status == JobStatus.QUEUED,
                   and_(Job.status == JobStatus.RUNNING, Job.heartbeat_at < stale_before)))
        .where(Job.cancel_requested.is_(False))
        .values(status=JobStatus.RUNNING, attempts=Job.attempts + 1, worker_id=worker_id, heartbeat_at=now,
                started_at=now, updated_at=now, error_code=None, error_message=None,
                progress_fraction=0.0, progress_step=None, progress_message="started")
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    _record(session, job_id, previous, JobStatus.RUNNING, f"attempt on {worker_id}")
    session.flush()
    session.refresh(job)
    return job


def heartbeat(session: Session, job_id: str, worker_id: str) -> tuple[bool, bool]:
    """Refresh the heartbeat. Returns (still_owned, cancel_requested)."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(heartbeat_at=utcnow(), version=Job.version).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False, False
    return True, bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def set_progress(session: Session, job_id: str, worker_id: str, fraction: float, step: str | None,
                 message: str | None, report: dict[str, Any] | None = None) -> tuple[bool, bool]:
    """Record progress (it doubles as a heartbeat), and `report` (app.core.job_events.progress_report) as a
    progress event when given. Returns (still_owned, cancel_requested)."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(progress_fraction=max(0.0, min(1.0, fraction)), progress_step=step, progress_message=message,
                heartbeat_at=utcnow(), updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False, False
    if report is not None:
        session.add(JobEvent(job_id=job_id, kind=EventKind.PROGRESS, from_status=JobStatus.RUNNING,
                             to_status=JobStatus.RUNNING, data=report))
    return True, bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish(session: Session, job_id: str, worker_id: str, status: JobStatus, *, error_code: str | None = None,
           error_message: str | None = None, metrics: dict[str, Any] | None = None,
           artifacts: list[dict[str, Any]] | None = None) -> bool:
    """Move a running job owned by `worker_id` to a terminal state, replacing its artifact rows.

    Replacing (not appending) keeps a re-run job's artifacts free of duplicates, and leaves no provisional one (the
    caller deletes the files that `provisional_keys` named and `artifacts` does not reuse).
    """
    assert status.is_terminal()
    now = utcnow()
    job = session.get(Job, job_id)
    values: dict[str, Any] = dict(status=status, finished_at=now, updated_at=now, error_code=error_code,
                                  error_message=error_message, metrics=metrics)
    if status == JobStatus.SUCCEEDED:
        values.update(progress_fraction=1.0, progress_message="done")
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(**values).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    for old in list(job.artifacts):
        session.delete(old)
    session.flush()
    for spec in artifacts or []:
        session.add(Artifact(id=new_id("art"), tenant_id=job.tenant_id, job_id=job_id, **spec))
    _record(session, job_id, JobStatus.RUNNING, status, error_message)
    webhooks.enqueue_job_event(session, job, status, now, error_code, error_message)
    session.flush()
    return True


def record_provisional(session: Session, job_id: str, worker_id: str, artifact: dict[str, Any]) -> list[str] | None:
    """Make `artifact` the running job's one provisional artifact (its best tuning trial so far), removing the
    previous one. Guarded like a progress report: only the worker that owns the running job records it.

    Returns the storage keys of the files no row refers to any more (to delete once this commits), or None when
    the job is no longer this worker's to add to (nothing recorded: the caller removes the file it stored).
    """
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(updated_at=utcnow()).execution_options(synchronize_session=False))
    if result.rowcount != 1:
        return None
    replaced = session.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.provisional.is_(True))).all()
    for old in replaced:
        session.delete(old)
    session.flush()
    tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    session.add(Artifact(id=new_id("art"), tenant_id=tenant_id, job_id=job_id, **{**artifact, "provisional": True}))
    session.flush()
    return [old.storage_key for old in replaced if old.storage_key != artifact["storage_key"]]


def provisional_keys(session: Session, job_id: str) -> list[str]:
    """Where the job's provisional artifacts are stored (read before `finish` replaces their rows)."""
    return list(session.scalars(select(Artifact.storage_key).where(Artifact.job_id == job_id,
                                                                   Artifact.provisional.is_(True))))


def request_cancel(session: Session, job: Job) -> bool:
    """Cancel a queued job now, or flag a running one to stop at its next check. False if already finished."""
    now = utcnow()
    if job.status == JobStatus.QUEUED:
        result = session.execute(
            update(Job).where(Job.id == job.id, Job.status == JobStatus.QUEUED)
            .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False))
        if result.rowcount == 1:
            _record(session, job.id, JobStatus.QUEUED, JobStatus.CANCELLED, "cancelled before it started")
            webhooks.enqueue_job_event(session, job, JobStatus.CANCELLED, now, None, None)
            return True
    result = session.execute(
        update(Job).where(Job.id == job.id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        .values(cancel_requested=True, updated_at=now).execution_options(synchronize_session=False))
    return result.rowcount == 1


def reap_stale(session: Session, stale_before: datetime, max_attempts: int) -> dict[str, list[str]]:
    """Running jobs whose heartbeat went stale: re-queue them, or fail them once attempts are used up."""
    stale = session.scalars(
        select(Job).where(Job.status == JobStatus.RUNNING, Job.heartbeat_at < stale_before)).all()
    outcome: dict[str, list[str]] = {"requeued": [], "failed": [], "cancelled": []}
    for job in stale:
        guard = (Job.id == job.id, Job.status == JobStatus.RUNNING, Job.heartbeat_at < stale_before)
        now = utcnow()
        if job.cancel_requested:
            values, kind, message = dict(status=JobStatus.CANCELLED, finished_at=now), "cancelled", \
                "cancelled; its worker stopped responding"
        elif job.attempts >= max_attempts:
            values, kind = dict(status=JobStatus.FAILED, finished_at=now, error_code=ErrorCode.WORKER_LOST,
                                error_message=f"the worker running this job stopped responding "
                                              f"{job.attempts} times; giving up"), "failed"
            message = values["error_message"]
        else:
            values, kind, message = dict(status=JobStatus.QUEUED, dispatched_at=None, worker_id=None,
                                          progress_message="re-queued after its worker stopped responding"), \
                "requeued", "worker stopped responding; re-queued"
        result = session.execute(update(Job).where(*guard).values(updated_at=now, **values)
                                 .execution_options(synchronize_session=False))
        if result.rowcount == 1:
            _record(session, job.id, JobStatus.RUNNING, values["status"], message)
            if kind != "requeued":
                # the best trial so far of a tune job is all the user gets of it: kept, no longer provisional
                session.execute(update(Artifact).where(Artifact.job_id == job.id, Artifact.provisional.is_(True))
                                .values(provisional=False).execution_options(synchronize_session=False))
                webhooks.enqueue_job_event(session, job, values["status"], now, values.get("error_code"),
                                           values.get("error_message"))
            outcome[kind].append(job.id)
    return outcome


def waiting_message(queue: str) -> str:
    """The progress message of a queued job whose queue no worker serves."""
    return f"waiting: no worker serves queue '{queue}'"


_WAITING_PREFIX = "waiting: no worker serves queue "


def note_waiting(session: Session, unserved_queues: list[str]) -> int:
    """Say in the progress message of each queued job whether a worker serves its queue; returns the jobs changed.
    `updated_at` is left alone: it says since when the job waits (see fail_unserved)."""
    changed = 0
    for queue in unserved_queues:
        message = waiting_message(queue)
        changed += session.execute(
            update(Job).where(Job.status == JobStatus.QUEUED, Job.queue == queue,
                              or_(Job.progress_message.is_(None), Job.progress_message != message))
            .values(progress_message=message).execution_options(synchronize_session=False)).rowcount
    changed += session.execute(
        update(Job).where(Job.status == JobStatus.QUEUED, Job.queue.not_in(unserved_queues),
                          Job.progress_message.startswith(_WAITING_PREFIX, autoescape=True))
        .values(progress_message=None).execution_options(synchronize_session=False)).rowcount
    return changed


def fail_unserved(session: Session, queue: str, queued_before: datetime, timeout_s: float) -> list[str]:
    """Fail the jobs queued (or re-queued) on `queue` before `queued_before`, whose queue no worker has served
    for `timeout_s`: nothing will ever run them. Up to 500 a call (the next round takes the rest); returns their
    ids."""
    waiting = session.scalars(select(Job).where(Job.status == JobStatus.QUEUED, Job.queue == queue,
                                                Job.updated_at < queued_before).order_by(Job.id).limit(500)).all()
    message = (f"no worker serves queue '{queue}': the job waited {timeout_s:.0f} s (MODELPRESS_QUEUE_TIMEOUT) "
               f"and none came; start one (modelpress worker --queues {queue}) and submit the job again")
    failed = []
    for job in waiting:
        now = utcnow()
        result = session.execute(
            update(Job).where(Job.id == job.id, Job.status == JobStatus.QUEUED, Job.updated_at < queued_before)
            .values(status=JobStatus.FAILED, finished_at=now, updated_at=now, error_code=ErrorCode.NO_WORKER,
                    error_message=message, progress_message=waiting_message(queue))
            .execution_options(synchronize_session=False))
        if result.rowcount == 1:
            _record(session, job.id, JobStatus.QUEUED, JobStatus.FAILED, message)
            webhooks.enqueue_job_event(session, job, JobStatus.FAILED, now, ErrorCode.NO_WORKER, message)
            failed.append(job.id)
    return failed


def mark_deleted(session: Session, job_id: str) -> bool:
    """Record that a finished job's outputs were removed from storage; False if it is unfinished or was already
    marked (the first deletion's time stays)."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(TERMINAL), Job.deleted_at.is_(None))
        .values(deleted_at=utcnow()).execution_options(synchronize_session=False))
    return result.rowcount == 1


def stale_cutoff(timeout_s: float) -> datetime:
    return utcnow() - timedelta(seconds=timeout_s)
