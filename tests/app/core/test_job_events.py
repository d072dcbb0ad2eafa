"""A job's event history: progress reports as streamed, the throttle that keeps fast loops to a few rows, and the
rows the state machine writes (status changes with the job as it was, progress reports)."""

import math

from sqlalchemy import select

from app.core import jobs
from app.core.auth import create_api_key
from app.core.db import session_scope
from app.core.ids import new_id
from app.core.job_events import ProgressThrottle, events_with_jobs, job_events_after, progress_report
from app.core.statuses import JobStatus
from app.core.tables import Job, JobEvent


def report(fraction=0.5, stage="quantize", message="m", **counters):
    return progress_report(fraction, stage, message, **counters)


def test_progress_report_has_the_streamed_fields_and_refuses_odd_values():
    assert report(0.25, step_index=1, epoch=2, trial=0) == {
        "stage": "quantize", "step_index": 1, "fraction": 0.25, "epoch": 2, "trial": 0, "message": "m"}
    for odd in (math.nan, math.inf, -math.inf, "0.5", None):
        assert report(odd)["fraction"] == 0.0
    assert report(-3)["fraction"] == 0.0 and report(7)["fraction"] == 1.0
    # Counters come from the sandboxed child: anything but a plain, sane integer is dropped.
    dropped = report(step_index=True, epoch=-1, trial=10**12)
    assert (dropped["step_index"], dropped["epoch"], dropped["trial"]) == (None, None, None)
    assert report(step_index="1")["step_index"] is None


def test_throttle_writes_the_first_report_and_what_moved():
    throttle = ProgressThrottle(min_interval=0.25, min_fraction_step=0.01)
    assert throttle.offer(report(0.100), now=0.0) == report(0.100)
    assert throttle.offer(report(0.105), now=1.0) is None  # under 1%, nothing else changed
    assert throttle.offer(report(0.110), now=2.0) == report(0.110)  # 1% since the last row, not the last report
    assert throttle.offer(report(0.110, message="other"), now=3.0) == report(0.110, message="other")
    assert throttle.offer(report(0.110, message="other", epoch=1), now=4.0) is not None
    assert throttle.offer(report(0.110, stage="tune", message="other", epoch=1), now=5.0) is not None


def test_throttle_holds_back_what_comes_too_soon_and_keeps_only_the_latest():
    throttle = ProgressThrottle(min_interval=0.25, min_fraction_step=0.01)
    throttle.offer(report(0.1, stage="load"), now=0.0)
    assert throttle.offer(report(0.2, stage="measure"), now=0.1) is None
    assert throttle.offer(report(0.3, stage="quantize"), now=0.2) is None
    assert throttle.due(now=0.24) is None
    assert throttle.due(now=0.25) == report(0.3, stage="quantize")
    assert throttle.due(now=5.0) is None  # written once


def test_throttle_drops_a_held_back_report_once_the_job_is_back_where_the_last_row_says():
    throttle = ProgressThrottle(min_interval=0.25, min_fraction_step=0.01)
    throttle.offer(report(0.1), now=0.0)
    assert throttle.offer(report(0.5), now=0.1) is None
    assert throttle.offer(report(0.1), now=0.2) is None
    assert throttle.due(now=1.0) is None


def test_a_fast_loop_writes_a_few_rows_a_second():
    throttle = ProgressThrottle(min_interval=0.25, min_fraction_step=0.01)
    written = [throttle.offer(report(i / 10_000, message=f"batch {i}"), now=i * 0.0001) for i in range(10_000)]
    written = [w for w in written if w is not None]
    # One second of reports, every one of them new (the message changes): the first, then one per interval.
    assert len(written) == 4 and written[0]["message"] == "batch 0"
    assert [w["fraction"] for w in written] == sorted(w["fraction"] for w in written)


def _events(factory, job_id) -> list[JobEvent]:
    with factory() as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def test_history_records_status_changes_with_the_job_as_it_was_and_progress_reports(factory, job_id):
    with session_scope(factory) as session:
        jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60))
    with session_scope(factory) as session:
        assert jobs.set_progress(session, job_id, "w1", 0.4, "quantize", "step 1/1", report(0.4)) == (True, False)
        assert jobs.set_progress(session, job_id, "w1", 0.5, "quantize", "no row", None) == (True, False)
    with session_scope(factory) as session:
        jobs.finish(session, job_id, "w1", JobStatus.FAILED, error_code="invalid_model", error_message="bad")
    queued, running, progress, failed = _events(factory, job_id)
    assert [(e.kind, e.to_status) for e in (queued, running, progress, failed)] == [
        ("status", "queued"), ("status", "running"), ("progress", "running"), ("status", "failed")]
    assert queued.data["attempts"] == 0 and queued.data["started_at"] is None and queued.data["error"] is None
    assert running.data["attempts"] == 1 and running.data["started_at"] is not None
    assert running.data["progress"] == {"fraction": 0.0, "step": None, "message": "started"}
    assert progress.data == report(0.4)
    assert failed.data["error"] == {"code": "invalid_model", "message": "bad"} and failed.data["finished_at"]


def test_a_progress_report_of_a_job_no_longer_ours_writes_no_event(factory, job_id):
    with session_scope(factory) as session:
        jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60))
    with session_scope(factory) as session:
        assert jobs.set_progress(session, job_id, "w2", 0.4, "quantize", None, report(0.4)) == (False, False)
    assert [e.kind for e in _events(factory, job_id)] == ["status", "status"]


def test_reads_for_the_streams_stay_within_the_job_the_tenant_and_the_id_range(factory, job_id):
    with session_scope(factory) as session:
        other_tenant, _ = create_api_key(session, new_id("tenant"))
        other_job = jobs.create_job(session, tenant_id=other_tenant.id, model_id="mdl_y", recipe={"steps": []},
                                    datasets={}, target={}, queue="cpu").id
        jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60))
    ours = [e.id for e in _events(factory, job_id)]
    theirs = [e.id for e in _events(factory, other_job)]
    with factory() as session:
        tenant_id = session.get(Job, job_id).tenant_id
        assert [e.id for e in job_events_after(session, job_id, 0, 10**9, 100)] == ours
        assert [e.id for e in job_events_after(session, job_id, ours[0], 10**9, 100)] == ours[1:]
        assert [e.id for e in job_events_after(session, job_id, 0, ours[0], 100)] == ours[:1]
        rows = events_with_jobs(session, 0, 10**9, 100, tenant_id=tenant_id)
        assert [event.id for event, _ in rows] == ours and {job.id for _, job in rows} == {job_id}
        assert not set(theirs) & {event.id for event, _ in rows}
        everyone = [event.id for event, _ in events_with_jobs(session, min(ours + theirs) - 1, 10**9, 100)]
        assert set(ours + theirs) <= set(everyone) and everyone == sorted(everyone)
