"""Sending work to the broker after its row is committed: "run job X", "inspect model Y".

A row is committed before its message is sent. `dispatched_at` marks the send; if the send fails (broker down),
it is cleared again and the API's housekeeping (app.api.housekeeping) sends the row later: nothing is lost.
The mark is a guarded UPDATE, so two senders never both send one row.
"""

import logging
from datetime import datetime

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.core.db import session_scope, utcnow
from app.core.queue import send_inspection, send_job
from app.core.tables import Job, Model

log = logging.getLogger(__name__)


def _mark_dispatched(factory: sessionmaker[Session], table, row_id: str,
                     sent_before: datetime | None = None) -> bool:
    """Take the send of a row that was never sent (or, for a re-send, last sent before `sent_before`)."""
    unsent = table.dispatched_at.is_(None) if sent_before is None else table.dispatched_at < sent_before
    with session_scope(factory) as session:
        result = session.execute(update(table).where(table.id == row_id, unsent)
                                 .values(dispatched_at=utcnow()).execution_options(synchronize_session=False))
        return result.rowcount == 1


def _unmark_dispatched(factory: sessionmaker[Session], table, row_id: str) -> None:
    with session_scope(factory) as session:
        session.execute(update(table).where(table.id == row_id).values(dispatched_at=None)
                        .execution_options(synchronize_session=False))


def dispatch_job(factory: sessionmaker[Session], celery: Celery, job_id: str, queue: str,
                 sent_before: datetime | None = None) -> bool:
    """Send "run job X" once; on a broker failure leave the job queued and undispatched for a later retry."""
    if not _mark_dispatched(factory, Job, job_id, sent_before):
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
