"""A job's event history (the `job_events` table): what is recorded, which progress reports are worth a row, and
the reads behind the Server-Sent Events streams.

Writes happen in app.core.jobs, after each transaction's guarded UPDATE of the job row: that row lock makes one
job's events commit in id order. Events of different jobs may commit out of id order; the stream reader waits for
such holes (app.api.event_stream).
"""

import math
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from app.core.tables import Job, JobEvent

# A progress report becomes an event when the fraction moved this much, or anything else in it changed, and
# never more often than every MIN_INTERVAL seconds (a later report replaces one held back; the worker writes the
# held-back one when its time comes: worker.context).
MIN_FRACTION_STEP = 0.01
MIN_INTERVAL = 0.25
# Counters from the sandboxed child are ignored past this (they are indexes and epochs, not ids).
MAX_COUNTER = 1_000_000


class EventKind(StrEnum):
    STATUS = "status"
    PROGRESS = "progress"


def _counter(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNTER:
        return value
    return None


def progress_report(fraction: float, stage: str | None, message: str | None, *, step_index: int | None = None,
                    epoch: int | None = None, trial: int | None = None) -> dict[str, Any]:
    """The data of a progress event, exactly as streamed: a finite fraction in [0, 1] and counters or null."""
    fraction = float(fraction) if isinstance(fraction, int | float) else 0.0
    fraction = round(min(1.0, max(0.0, fraction)), 4) if math.isfinite(fraction) else 0.0
    return {"stage": stage, "step_index": _counter(step_index), "fraction": fraction, "epoch": _counter(epoch),
            "trial": _counter(trial), "message": message}


class ProgressThrottle:
    """Decides which progress reports of one running job are written as events, so a fast loop writes a few rows
    a second at most. Reports are compared with the last one written, so slow creeping still shows."""

    def __init__(self, min_interval: float = MIN_INTERVAL, min_fraction_step: float = MIN_FRACTION_STEP):
        self.min_interval, self.min_fraction_step = min_interval, min_fraction_step
        self.recorded: dict[str, Any] | None = None
        self.recorded_at = -math.inf
        self.pending: dict[str, Any] | None = None

    def _worth_a_row(self, report: dict[str, Any]) -> bool:
        if self.recorded is None:
            return True
        if abs(report["fraction"] - self.recorded["fraction"]) >= self.min_fraction_step - 1e-9:  # 0.11 - 0.1
            return True
        return any(report[key] != self.recorded[key] for key in report if key != "fraction")

    def _take(self, report: dict[str, Any], now: float) -> dict[str, Any]:
        self.recorded, self.recorded_at, self.pending = report, now, None
        return report

    def offer(self, report: dict[str, Any], now: float) -> dict[str, Any] | None:
        """The report to write now, or None: not worth a row, or held back until the interval has passed."""
        if not self._worth_a_row(report):
            self.pending = None  # the job is back where the last row says: nothing held back is news any more
            return None
        if now - self.recorded_at >= self.min_interval:
            return self._take(report, now)
        self.pending = report
        return None

    def due(self, now: float) -> dict[str, Any] | None:
        """The held-back report, once its interval has passed (else None)."""
        if self.pending is not None and now - self.recorded_at >= self.min_interval:
            return self._take(self.pending, now)
        return None


def _moment(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def status_snapshot(session: Session, job_id: str) -> dict[str, Any]:
    """The fields of a job that change over its life, as they are now: a replayed status event shows the job as
    it was then, not as it is at the time of the replay."""
    row = session.execute(select(Job.attempts, Job.progress_fraction, Job.progress_step, Job.progress_message,
                                 Job.error_code, Job.error_message, Job.cancel_requested, Job.started_at,
                                 Job.finished_at).where(Job.id == job_id)).one()
    return {"attempts": row.attempts,
            "progress": {"fraction": row.progress_fraction, "step": row.progress_step,
                         "message": row.progress_message},
            "error": {"code": row.error_code, "message": row.error_message or ""} if row.error_code else None,
            "cancel_requested": row.cancel_requested, "started_at": _moment(row.started_at),
            "finished_at": _moment(row.finished_at)}


def job_events_after(session: Session, job_id: str, after: int, upto: int, limit: int) -> list[JobEvent]:
    """One job's events with `after < id <= upto`, oldest first."""
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after,
                                                       JobEvent.id <= upto).order_by(JobEvent.id).limit(limit)))


def last_event_id(session: Session, job_id: str) -> int:
    return session.scalar(select(func.coalesce(func.max(JobEvent.id), 0)).where(JobEvent.job_id == job_id))


def events_with_jobs(session: Session, after: int, upto: int, limit: int,
                     tenant_id: str | None = None) -> list[tuple[JobEvent, Job]]:
    """Events with `after < id <= upto` (of one tenant's jobs, or of all), oldest first, each with its job and the
    job's artifacts loaded (they outlive the session)."""
    query = (select(JobEvent, Job).join(Job, Job.id == JobEvent.job_id)
             .where(JobEvent.id > after, JobEvent.id <= upto).order_by(JobEvent.id).limit(limit)
             .options(selectinload(Job.artifacts)))
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    return [(event, job) for event, job in session.execute(query).tuples()]


def event_ids_after(session: Session, after: int, limit: int) -> list[int]:
    """Committed event ids above `after` (every tenant's), ascending: how the stream reader finds holes."""
    return list(session.scalars(select(JobEvent.id).where(JobEvent.id > after).order_by(JobEvent.id).limit(limit)))


def newest_event_id(session: Session) -> int:
    return session.scalar(select(func.coalesce(func.max(JobEvent.id), 0)))
