"""The job state machine: guarded transitions, history, re-queue and give-up rules."""

from datetime import timedelta

from sqlalchemy import select, update

from app.core import jobs
from app.core.db import session_scope, utcnow
from app.core.tables import Job, JobEvent


def _status(factory, job_id):
    with factory() as session:
        return session.get(Job, job_id)


def test_claim_runs_once(factory, job_id):
    cutoff = jobs.stale_cutoff(60)
    with session_scope(factory) as session:
        assert jobs.claim(session, job_id, "w1", cutoff) is not None
    with session_scope(factory) as session:
        assert jobs.claim(session, job_id, "w2", cutoff) is None  # alive on w1
    job = _status(factory, job_id)
    assert (job.status, job.worker_id, job.attempts) == ("running", "w1", 1)


def test_finished_job_never_starts_again(factory, job_id):
    with session_scope(factory) as session:
        jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60))
        assert jobs.finish(session, job_id, "w1", jobs.JobStatus.SUCCEEDED, metrics={"a": 1})
    with session_scope(factory) as session:
        assert jobs.claim(session, job_id, "w2", utcnow() + timedelta(days=1)) is None
        assert not jobs.finish(session, job_id, "w1", jobs.JobStatus.FAILED, error_code="x", error_message="y")
        assert not jobs.request_cancel(session, session.get(Job, job_id))
    assert _status(factory, job_id).status == "succeeded"


def test_cancelled_job_stays_cancelled(factory, job_id):
    with session_scope(factory) as session:
        assert jobs.request_cancel(session, session.get(Job, job_id))
    with session_scope(factory) as session:
        assert jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60)) is None
    assert _status(factory, job_id).status == "cancelled"


def test_finish_by_a_worker_that_lost_the_job_is_refused(factory, job_id):
    with session_scope(factory) as session:
        jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60))
    with session_scope(factory) as session:  # w1 went silent; w2 takes over
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1)))
    with session_scope(factory) as session:
        assert jobs.claim(session, job_id, "w2", jobs.stale_cutoff(60)) is not None
    with session_scope(factory) as session:
        assert not jobs.finish(session, job_id, "w1", jobs.JobStatus.SUCCEEDED)
        assert jobs.heartbeat(session, job_id, "w1") == (False, False)
        assert jobs.finish(session, job_id, "w2", jobs.JobStatus.SUCCEEDED)
    assert _status(factory, job_id).attempts == 2


def test_reaper_requeues_then_gives_up(factory, job_id):
    stale = utcnow() - timedelta(minutes=5)
    for attempt in (1, 2):
        with session_scope(factory) as session:
            jobs.claim(session, job_id, f"w{attempt}", jobs.stale_cutoff(60))
            session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=stale))
        with session_scope(factory) as session:
            outcome = jobs.reap_stale(session, jobs.stale_cutoff(60), max_attempts=2)
        expected = "requeued" if attempt == 1 else "failed"
        assert job_id in outcome[expected]  # the database is shared: other tests' running jobs go stale too
    job = _status(factory, job_id)
    assert job.status == "failed" and job.error_code == "worker_lost" and "2 times" in job.error_message
    with factory() as session:
        history = session.scalars(select(JobEvent.to_status).where(JobEvent.job_id == job_id)
                                  .order_by(JobEvent.id)).all()
    assert history == ["queued", "running", "queued", "running", "failed"]


def test_reaper_leaves_live_jobs_alone(factory, job_id):
    with session_scope(factory) as session:
        jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60))
    with session_scope(factory) as session:
        outcome = jobs.reap_stale(session, jobs.stale_cutoff(60), 3)
    assert all(job_id not in reaped for reaped in outcome.values())
    assert _status(factory, job_id).status == "running"


def _artifact(name: str) -> dict:
    return {"kind": "model", "format": "onnx", "filename": f"m-{name}", "size_bytes": 1, "sha256": "0" * 64,
            "storage_key": f"tenants/t/jobs/j/{name}"}


def _artifacts(factory, job_id) -> list[tuple[str, bool]]:
    with factory() as session:
        return [(a.filename, a.provisional) for a in session.get(Job, job_id).artifacts]


def test_a_better_trial_replaces_the_provisional_artifact_and_finish_leaves_none(factory, job_id):
    with session_scope(factory) as session:
        jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60))
    with session_scope(factory) as session:
        assert jobs.record_provisional(session, job_id, "w1", _artifact("trial0.onnx")) == []
    with session_scope(factory) as session:  # the same key again (a re-run's trial 0) is not a file to delete
        assert jobs.record_provisional(session, job_id, "w1", _artifact("trial0.onnx")) == []
    with session_scope(factory) as session:
        assert jobs.record_provisional(session, job_id, "w1", _artifact("trial2.onnx")) == \
            ["tenants/t/jobs/j/trial0.onnx"]
    assert _artifacts(factory, job_id) == [("m-trial2.onnx", True)]
    with session_scope(factory) as session:  # another worker's report is not recorded
        assert jobs.record_provisional(session, job_id, "w2", _artifact("trial3.onnx")) is None
        assert jobs.provisional_keys(session, job_id) == ["tenants/t/jobs/j/trial2.onnx"]
        assert jobs.finish(session, job_id, "w1", jobs.JobStatus.SUCCEEDED, artifacts=[_artifact("final.onnx")])
    assert _artifacts(factory, job_id) == [("m-final.onnx", False)]
    with session_scope(factory) as session:  # nor once the job has ended
        assert jobs.record_provisional(session, job_id, "w1", _artifact("trial4.onnx")) is None
    assert _artifacts(factory, job_id) == [("m-final.onnx", False)]


def test_a_job_the_reaper_ends_keeps_its_best_trial_as_a_final_artifact(factory, job_id):
    with session_scope(factory) as session:
        jobs.claim(session, job_id, "w1", jobs.stale_cutoff(60))
        jobs.record_provisional(session, job_id, "w1", _artifact("trial1.onnx"))
        session.execute(update(Job).where(Job.id == job_id).values(attempts=3, heartbeat_at=utcnow() - timedelta(
            hours=1)))
    with session_scope(factory) as session:
        assert job_id in jobs.reap_stale(session, jobs.stale_cutoff(60), max_attempts=3)["failed"]
    assert _artifacts(factory, job_id) == [("m-trial1.onnx", False)]
