"""A job whose message could not be sent (broker down) stays queued and is sent once the broker is back."""

import redis
from fastapi.testclient import TestClient

from app.api.housekeeping import dispatch_pending
from app.api.main import create_app
from app.core.auth import create_api_key
from app.core.config import Settings
from app.core.db import make_engine, make_session_factory, session_scope
from app.core.migrate import upgrade
from app.core.queue import make_celery
from app.core.tables import Job
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
