"""Cancel, time limits and a worker killed mid-job, with real Celery worker processes."""

import time

import pytest
from fastapi.testclient import TestClient

from app.api.housekeeping import dispatch_pending, reap
from app.api.main import create_app
from app.core.auth import create_api_key
from app.core.config import Settings
from app.core.db import make_engine, make_session_factory, session_scope
from app.core.migrate import upgrade
from app.core.tables import Artifact
from tests.conftest import create_pg_database, drop_pg_database
from tests.e2e.conftest import MODELPRESS, wait_until
from tests.helpers import save_onnx

pytestmark = pytest.mark.e2e
RECIPE = {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]}


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {"MODELPRESS_HOME": str(settings.home), "MODELPRESS_HEARTBEAT_INTERVAL": "0.5"}
    if settings.database_url:
        env["MODELPRESS_DATABASE_URL"] = settings.database_url
    if settings.broker_url:
        env["MODELPRESS_BROKER_URL"] = settings.broker_url
    return {**env, **extra}


def _setup(settings: Settings, tmp_path):
    upgrade(settings.resolved_database_url())
    factory = make_session_factory(make_engine(settings.resolved_database_url()))
    with session_scope(factory) as session:
        _, key = create_api_key(session, "lifecycle")
    client = TestClient(create_app(settings, housekeeping=False))
    client.headers["Authorization"] = f"Bearer {key}"
    with open(save_onnx(tmp_path / "m.onnx", 16, 64, 4), "rb") as fh:
        model = client.post("/v1/models", files={"file": ("m.onnx", fh)}).json()
    return client, factory, model["id"]


def _job(client, job_id):
    return client.get(f"/v1/jobs/{job_id}").json()


def test_cancel_running_job_and_time_limit(tmp_path, processes):
    settings = Settings(home=tmp_path / "home")
    client, _, model_id = _setup(settings, tmp_path)
    # Endless latency runs keep a job busy; the soft limit ends what the cancel does not.
    processes.start("worker", [*MODELPRESS, "worker"], _env(
        settings, MODELPRESS_LATENCY_RUNS="100000000", MODELPRESS_JOB_SOFT_TIME_LIMIT="12",
        MODELPRESS_JOB_TIME_LIMIT="40"))
    to_cancel = client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
    wait_until(lambda: _job(client, to_cancel)["progress"]["step"] == "measure", 90, "job to be measuring", processes)
    assert client.post(f"/v1/jobs/{to_cancel}/cancel").status_code == 202
    job = wait_until(lambda: (j := _job(client, to_cancel))["status"] != "running" and j, 30, "cancel", processes)
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"

    to_time_out = client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
    job = wait_until(lambda: (j := _job(client, to_time_out))["status"] in ("failed", "succeeded") and j, 90,
                     "time limit", processes)
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
    assert client.post(f"/v1/jobs/{to_time_out}/cancel").status_code == 409


def test_killed_worker_job_runs_again_elsewhere(tmp_path, processes, redis_url):
    database_url = create_pg_database()
    try:
        settings = Settings(home=tmp_path / "home", database_url=database_url, broker_url=redis_url,
                            heartbeat_timeout=3, dispatch_retry_after=0)
        client, factory, model_id = _setup(settings, tmp_path)
        doomed = processes.start("doomed-worker", [*MODELPRESS, "worker"],
                                 _env(settings, MODELPRESS_LATENCY_RUNS="100000000"))
        job_id = client.post("/v1/jobs", json={"model_id": model_id, "recipe": RECIPE}).json()["id"]
        wait_until(lambda: _job(client, job_id)["progress"]["step"] == "measure", 90, "job to start", processes)
        processes.kill(doomed)  # kill -9 the whole worker, mid-job

        processes.start("rescue-worker", [*MODELPRESS, "worker"], _env(settings, MODELPRESS_LATENCY_RUNS="20"))
        time.sleep(settings.heartbeat_timeout + 0.5)
        assert reap(factory, settings)["requeued"] == [job_id]
        assert _job(client, job_id)["status"] == "queued"
        assert dispatch_pending(factory, client.app.state.celery, settings) >= 1
        job = wait_until(lambda: (j := _job(client, job_id))["status"] in ("succeeded", "failed") and j, 120,
                         "the rescued job", processes)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        with factory() as session:
            assert sorted(a.kind for a in session.query(Artifact).filter_by(job_id=job_id)) == [
                "card", "model", "report", "report"]  # the report in JSON and HTML
        job_keys = [k for k in client.app.state.storage.list_keys("tenants") if f"/jobs/{job_id}/" in k]
        assert len(job_keys) == 4
    finally:
        client.close()
        drop_pg_database(database_url)
