"""The job context's progress reports against a real database: every report updates the job row, a few a second
become progress events, and one held back is written at a later check."""

from types import SimpleNamespace

import pytest
from sqlalchemy import select

from app.core import jobs
from app.core.db import session_scope
from app.core.tables import Job, JobEvent
from worker import context
from worker.context import JobContext


@pytest.fixture
def running_job(factory, job_id):
    with session_scope(factory) as session:
        jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60))
    return job_id


@pytest.fixture
def clock(monkeypatch):
    """The context's clock, moved by the test."""
    now = [100.0]
    monkeypatch.setattr(context, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=lambda s: None))
    return now


def _progress_events(factory, job_id) -> list[dict]:
    with factory() as session:
        return list(session.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.kind == "progress")
                                    .order_by(JobEvent.id)))


def test_a_fast_loop_writes_a_few_events_and_the_last_one_later(factory, running_job, clock):
    ctx = JobContext(factory, running_job, "w1", heartbeat_interval=60)
    for batch in range(200):  # 200 reports in one second of the context's clock
        ctx.progress(0.3 + batch / 1000, "distill", f"batch {batch}", step_index=0, epoch=1)
        clock[0] += 0.005
    events = _progress_events(factory, running_job)
    assert len(events) == 4  # at 0, 0.25, 0.5 and 0.75 s
    assert events[0] == {"stage": "distill", "step_index": 0, "fraction": 0.3, "epoch": 1, "trial": None,
                         "message": "batch 0"}
    with factory() as session:
        assert session.get(Job, running_job).progress_message == "batch 199"  # the row has every report
    clock[0] += 0.1
    ctx.check()  # a poll after the loop: the held-back report's time has come
    events = _progress_events(factory, running_job)
    assert len(events) == 5 and events[-1]["message"] == "batch 199"
    ctx.check()
    assert len(_progress_events(factory, running_job)) == 5


def test_a_report_that_changes_nothing_writes_no_event(factory, running_job, clock):
    ctx = JobContext(factory, running_job, "w1", heartbeat_interval=60)
    for _ in range(3):
        ctx.progress(0.5, "measure", "measuring the baseline")
        clock[0] += 10
        ctx.check()
    assert len(_progress_events(factory, running_job)) == 1
