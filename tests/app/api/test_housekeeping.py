"""The API's housekeeping: a job whose message could not be sent (broker down) stays queued and is sent once the
broker is back; a job on a queue no worker serves says so, then fails `no_worker`; outputs past the retention
period are deleted."""

from datetime import timedelta

import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.api.housekeeping import dispatch_pending, expire_outputs, watch_queues
from app.api.limits import storage_used
from app.api.main import create_app
from app.core import jobs, presence
from app.core.auth import create_api_key
from app.core.config import Settings
from app.core.db import make_engine, make_session_factory, session_scope, utcnow
from app.core.ids import new_id
from app.core.migrate import upgrade
from app.core.queue import make_celery
from app.core.storage import open_storage
from app.core.tables import Job, JobEvent, QueueHeartbeat, WebhookEvent
from tests.helpers import save_onnx


def test_job_submitted_while_broker_is_down_is_sent_later(tmp_path, redis_url):
    down = Settings(home=tmp_path, broker_url="redis://127.0.0.1:1/0", dispatch_retry_after=0)
    upgrade(down.resolved_database_url())
    factory = make_session_factory(make_engine(down.resolved_database_url()))
    with session_scope(factory) as session:
        _, key = create_api_key(session, "t")
    with TestClient(create_app(down, housekeeping=False)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        with open(save_onnx(tmp_path / "m.onnx"), "rb") as fh:
            model = client.post("/v1/models", files={"file": ("m.onnx", fh)})
        assert model.status_code == 201  # accepted; its inspection waits for the broker too
        response = client.post("/v1/jobs", json={"model_id": model.json()["id"],
                                                 "recipe": {"steps": [{"op": "quantize"}]}})
        assert response.status_code == 201
        assert response.json()["status"] == "queued"
        job_id = response.json()["id"]
    with factory() as session:
        assert session.get(Job, job_id).dispatched_at is None

    queue = redis.Redis.from_url(redis_url)
    queue.delete("cpu")
    back = down.model_copy(update={"broker_url": redis_url})
    assert dispatch_pending(factory, make_celery(back), back) == 2  # the inspection and the job
    with factory() as session:
        assert session.get(Job, job_id).dispatched_at is not None
        assert session.get(Job, job_id).status == "queued"
    messages = [m.decode() for m in queue.lrange("cpu", 0, -1)]
    assert any(job_id in m for m in messages)
    assert dispatch_pending(factory, make_celery(back), back) == 0  # nothing is sent twice
    queue.delete("cpu")


def _queued_job(factory, queue: str, tenant_id: str | None = None) -> str:
    with session_scope(factory) as session:
        if tenant_id is None:
            tenant_id = create_api_key(session, new_id("tenant"))[0].id
        return jobs.create_job(session, tenant_id=tenant_id, model_id="mdl_x", recipe={"steps": []}, datasets={},
                               target={}, queue=queue, webhook_url="https://example.com/hook").id


def _backdate(factory, job_id: str, **ago: timedelta) -> None:
    with session_scope(factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**{k: utcnow() - v for k, v in ago.items()}))


def test_a_job_no_worker_can_run_says_so_then_fails_no_worker(settings, no_workers):
    factory = no_workers
    short = settings.model_copy(update={"queue_timeout": 5.0, "heartbeat_timeout": 60.0})
    gpu, cpu = _queued_job(factory, "gpu"), _queued_job(factory, "cpu")
    with session_scope(factory) as session:
        presence.record(session, "cpu-1@host", ["cpu"])
    assert gpu not in watch_queues(factory, short, may_fail=True)  # it has waited less than the timeout
    with factory() as session:
        assert session.get(Job, gpu).progress_message == "waiting: no worker serves queue 'gpu'"
        assert session.get(Job, cpu).progress_message is None

    _backdate(factory, gpu, updated_at=timedelta(seconds=6))
    _backdate(factory, cpu, updated_at=timedelta(hours=2))  # long queued, but its queue has a worker
    assert gpu not in watch_queues(factory, short, may_fail=False)  # the database has not answered long enough
    failed = watch_queues(factory, short, may_fail=True)
    assert gpu in failed and cpu not in failed
    with factory() as session:
        failed, waiting = session.get(Job, gpu), session.get(Job, cpu)
        assert (failed.status, failed.error_code) == ("failed", "no_worker")
        assert failed.finished_at is not None
        assert "no worker serves queue 'gpu'" in failed.error_message
        assert waiting.status == "queued"
        history = session.scalars(select(JobEvent.to_status).where(JobEvent.job_id == gpu).order_by(JobEvent.id))
        assert list(history) == ["queued", "failed"]
        event = session.scalars(select(WebhookEvent).where(WebhookEvent.job_id == gpu)).one()
        assert event.payload["data"]["error"]["code"] == "no_worker"


def test_a_queue_served_lately_neither_waits_nor_fails(settings, no_workers):
    factory = no_workers
    hour = settings.model_copy(update={"queue_timeout": 3600.0, "heartbeat_timeout": 60.0})
    gpu = _queued_job(factory, "gpu")
    assert gpu not in watch_queues(factory, hour, may_fail=True)
    with session_scope(factory) as session:
        presence.record(session, "gpu-1@host", ["gpu"])
    watch_queues(factory, hour, may_fail=True)
    with factory() as session:
        assert session.get(Job, gpu).progress_message is None  # a worker came: the note goes

    # The worker went away two minutes ago: the job waits again, but is not failed until no worker has served
    # the queue for queue_timeout, however long the job itself has waited.
    with session_scope(factory) as session:
        session.execute(update(QueueHeartbeat).values(seen_at=utcnow() - timedelta(minutes=2)))
    _backdate(factory, gpu, updated_at=timedelta(hours=2))
    assert gpu not in watch_queues(factory, hour, may_fail=True)
    with factory() as session:
        assert session.get(Job, gpu).status == "queued"
        assert session.get(Job, gpu).progress_message == "waiting: no worker serves queue 'gpu'"


def test_outputs_past_the_retention_period_expire(settings, finish_job, no_workers):
    factory = no_workers
    storage = open_storage(settings.resolved_storage_url())
    old, recent = _queued_job(factory, "cpu"), _queued_job(factory, "cpu")
    with factory() as session:
        tenant_id = session.get(Job, old).tenant_id
    running = _queued_job(factory, "cpu", tenant_id)
    old_keys, recent_keys = finish_job(old), finish_job(recent)
    _backdate(factory, old, finished_at=timedelta(days=3))
    with session_scope(factory) as session:
        jobs.claim(session, running, "w1", jobs.stale_cutoff(60))
    _backdate(factory, running, created_at=timedelta(days=30))
    with factory() as session:
        used = storage_used(session, tenant_id)

    assert expire_outputs(factory, storage, settings) == []  # retention is off by default
    kept = settings.model_copy(update={"artifact_retention_days": 2.5})
    assert old in expire_outputs(factory, storage, kept)
    assert not any(storage.exists(key) for key in old_keys)
    assert all(storage.exists(key) for key in recent_keys)
    with factory() as session:
        assert session.get(Job, old).deleted_at is not None
        assert session.get(Job, recent).deleted_at is None
        assert session.get(Job, running).deleted_at is None
        assert storage_used(session, tenant_id) == used - 2000  # the old job's two 1000-byte files
    assert old not in expire_outputs(factory, storage, kept)  # done once
