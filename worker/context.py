"""The running job as the pipeline sees it: progress reports, cancel checks, and a heartbeat thread.

State writes retry through short database outages, so a restarting database does not fail the job. Every progress
report updates the job row; the ones worth it also become progress events (app.core.job_events.ProgressThrottle),
and one held back by the throttle is written at a later `check`, which the sandbox's parent calls every poll.
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
from app.core.job_events import ProgressThrottle, progress_report
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
        self.throttle = ProgressThrottle()
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
        """Stop here if the job was cancelled or taken over by another worker (and write a held-back progress
        event whose time has come)."""
        report = self.throttle.due(time.monotonic())
        if report is not None:
            try:
                self._write_progress(report, report, attempts=3)
            except OperationalError as exc:
                log.warning("progress event for %s not written: %s", self.job_id, exc.orig)
        self._stop_if_told()

    def _stop_if_told(self) -> None:
        if self.lost:
            raise JobLost(self.job_id)
        if self.cancel_requested:
            raise JobCancelled(self.job_id)

    def progress(self, fraction: float, step: str | None, message: str | None, *, step_index: int | None = None,
                 epoch: int | None = None, trial: int | None = None) -> None:
        """`step` is the stage (load, measure, a recipe op, tune, package, upload); `step_index` the recipe step
        (from 0), `epoch` the training epoch (from 1), `trial` the tuning trial (from 0)."""
        self._stop_if_told()
        report = progress_report(fraction, step, message, step_index=step_index, epoch=epoch, trial=trial)
        self._write_progress(report, self.throttle.offer(report, time.monotonic()))
        log.info("job %s %.0f%% %s: %s", self.job_id, fraction * 100, step, message)
        self._stop_if_told()

    def _write_progress(self, report: dict, event: dict | None, attempts: int = 12) -> None:
        owned, cancel = with_db_retry(self.factory, lambda s: jobs.set_progress(
            s, self.job_id, self.worker_id, report["fraction"], report["stage"], report["message"], event),
            attempts=attempts)
        self.lost = self.lost or not owned
        self.cancel_requested = self.cancel_requested or cancel
