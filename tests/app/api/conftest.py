"""An in-process API (FastAPI TestClient) over a real database, a real filesystem broker and local storage."""

import hashlib

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete

from app.api.main import create_app
from app.core import jobs
from app.core.auth import create_api_key
from app.core.db import make_engine, make_session_factory, session_scope
from app.core.ids import new_id
from app.core.statuses import JobStatus
from app.core.storage import keys as storage_keys
from app.core.storage import open_storage
from app.core.tables import QueueHeartbeat
from tests.helpers import save_onnx, save_pt2


@pytest.fixture
def client(settings):
    app = create_app(settings, housekeeping=False)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def make_key(settings):
    """Creates a fresh tenant with its own key: tests never see each other's data."""
    engine = make_engine(settings.resolved_database_url())
    factory = make_session_factory(engine)

    def _make(tenant: str | None = None) -> dict[str, str]:
        with session_scope(factory) as session:
            _, key = create_api_key(session, tenant or new_id("tenant"))
        return {"Authorization": f"Bearer {key}"}

    yield _make
    engine.dispose()


@pytest.fixture
def auth(make_key) -> dict[str, str]:
    return make_key()


@pytest.fixture(scope="session")
def onnx_bytes(tmp_path_factory) -> bytes:
    return save_onnx(tmp_path_factory.mktemp("onnx") / "mlp.onnx").read_bytes()


@pytest.fixture(scope="session")
def pt2_bytes(tmp_path_factory) -> bytes:
    return save_pt2(tmp_path_factory.mktemp("pt2") / "mlp.pt2").read_bytes()


@pytest.fixture
def upload(client, auth, onnx_bytes):
    def _upload(data: bytes = onnx_bytes, filename: str = "mlp.onnx", headers=None, **fields):
        return client.post("/v1/models", headers=headers or auth, files={"file": (filename, data)}, data=fields)

    return _upload


@pytest.fixture
def finish_job(settings, tmp_path):
    """Runs a queued job to `succeeded` as a worker would: its two output files stored, its artifact rows written.
    Returns the storage keys of the files."""
    engine = make_engine(settings.resolved_database_url())
    factory = make_session_factory(engine)
    storage = open_storage(settings.resolved_storage_url())

    def _finish(job_id: str, size: int = 1000) -> list[str]:
        with session_scope(factory) as session:
            job = jobs.claim(session, job_id, "test-worker", jobs.stale_cutoff(60))
            outputs = []
            for kind, filename in (("model", "model.onnx"), ("report", "report.json")):
                local = tmp_path / f"{job_id}-{filename}"
                local.write_bytes(b"x" * size)
                key = storage_keys.job_key(job.tenant_id, job_id, filename)
                storage.put_file(key, local)
                outputs.append(dict(kind=kind, format=filename.split(".")[1], filename=filename, size_bytes=size,
                                    sha256=hashlib.sha256(local.read_bytes()).hexdigest(), storage_key=key))
            assert jobs.finish(session, job_id, "test-worker", JobStatus.SUCCEEDED, metrics={"done": True},
                               artifacts=outputs)
        return [output["storage_key"] for output in outputs]

    yield _finish
    engine.dispose()


@pytest.fixture
def no_workers(settings):
    """No worker serves any queue (queue heartbeats are shared by every test on a database): the test adds its own."""
    engine = make_engine(settings.resolved_database_url())
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        session.execute(delete(QueueHeartbeat))
    yield factory
    with session_scope(factory) as session:
        session.execute(delete(QueueHeartbeat))
    engine.dispose()
