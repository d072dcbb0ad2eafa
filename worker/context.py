"""The running job as the pipeline sees it: progress reports, cancel checks, and a heartbeat thread.

State writes retry through short database outages, so a restarting database does not fail the job.
"""

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.core import jobs
from app.core.db import session_scope
from worker.errors import JobCancelled, JobLost

log = logging.getLogger(__name__)
T = TypeVar("T")


def with_db_retry(factory: sessionmaker[Session], write: Callable[[Session], T], attempts: int = 12) -> T:
    """Run `write` in its own transaction, retrying with backoff while the database is unreachable."""
    delay = 0.5
    for attempt in range(attempts):
        try:
            with session_scope(factory) as session:
                return write(session)
        except OperationalError as exc:
            if attempt == attempts - 1:
                raise
            log.warning("database write failed (%s); retrying in %.1fs", exc.orig, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


class JobContext:
    def __init__(self, factory: sessionmaker[Session], job_id: str, worker_id: str, heartbeat_interval: float):
        self.factory, self.job_id, self.worker_id = factory, job_id, worker_id
        self.heartbeat_interval = heartbeat_interval
        self.cancel_requested = False
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "JobContext":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                owned, cancel = with_db_retry(self.factory, lambda s: jobs.heartbeat(s, self.job_id, self.worker_id),
                                              attempts=3)
            except Exception as exc:
                log.warning("heartbeat for %s failed: %s", self.job_id, exc)
                continue
            self.lost = self.lost or not owned
            self.cancel_requested = self.cancel_requested or cancel

    def check(self) -> None:
        """Stop here if the job was cancelled or taken over by another worker."""
        if self.lost:
            raise JobLost(self.job_id)
        if self.cancel_requested:
            raise JobCancelled(self.job_id)

    def progress(self, fraction: float, step: str | None, message: str | None) -> None:
        self.check()
        owned, cancel = with_db_retry(
            self.factory, lambda s: jobs.set_progress(s, self.job_id, self.worker_id, fraction, step, message))
        self.lost = self.lost or not owned
        self.cancel_requested = self.cancel_requested or cancel
        log.info("job %s %.0f%% %s: %s", self.job_id, fraction * 100, step, message)
        self.check()
