"""Fixtures for the hostile-input suite.

The in-process API (tests/app/api) and the worker's fixtures (tests/worker) are re-exported here. `worker`
runs the worker's tasks on the worker fixtures' database (files that bypassed the API); `worker_for_api` points
the worker at the API's own database and storage, so an attack uploaded through the real API is then
inspected or run by the worker, as in production.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.config import Settings, get_settings
from app.core.tables import Job, Model
from tests.app.api.conftest import auth, client, make_key, onnx_bytes, pt2_bytes, upload  # noqa: F401
from tests.hostile.builders import tree
from tests.worker.conftest import add_job, add_model, db, worker_env  # noqa: F401


class Worker:
    """Runs the worker's tasks in this process, against whatever database and storage its settings name."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def inspect(self, model_id: str) -> Model:
        from worker import resources
        from worker.tasks import inspect_model

        inspect_model(model_id)
        with resources.session_factory()() as session:
            return session.get(Model, model_id)

    def run(self, job_id: str) -> Job:
        from worker import resources
        from worker.tasks import run_job

        run_job(job_id)
        with resources.session_factory()() as session:
            return session.get(Job, job_id)

    def leftovers(self) -> list[Path]:
        """What the worker left in its scratch space: nothing, whatever the attack."""
        work = self.settings.resolved_home() / "work"
        return sorted(work.rglob("*")) if work.exists() else []


@pytest.fixture
def worker(worker_env: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Worker]:  # noqa: F811
    """The worker on its own database and storage, for files that never went through the API; its upload limit
    is the API tests' 5 MiB, so limits derived from it are reached quickly."""
    from worker import resources

    monkeypatch.setenv("MODELPRESS_MAX_UPLOAD_BYTES", str(5 * 1024 * 1024))
    get_settings.cache_clear()
    resources._resources.cache_clear()
    yield Worker(get_settings())
    get_settings.cache_clear()
    resources._resources.cache_clear()


@pytest.fixture
def worker_for_api(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Worker]:
    """The worker on the API's database and storage: uploads go through the real API, then to it."""
    from worker import resources

    monkeypatch.setenv("MODELPRESS_HOME", str(settings.home))
    monkeypatch.setenv("MODELPRESS_STORAGE_URL", settings.resolved_storage_url())
    monkeypatch.setenv("MODELPRESS_DATABASE_URL", settings.resolved_database_url())
    monkeypatch.setenv("MODELPRESS_MAX_UPLOAD_BYTES", str(settings.max_upload_bytes))
    monkeypatch.setenv("MODELPRESS_LATENCY_RUNS", "3")
    monkeypatch.setenv("MODELPRESS_LATENCY_WARMUP", "1")
    monkeypatch.setenv("MODELPRESS_HEARTBEAT_INTERVAL", "0.2")
    get_settings.cache_clear()
    resources._resources.cache_clear()
    yield Worker(settings)
    get_settings.cache_clear()
    resources._resources.cache_clear()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Path]:
    """A folder next to the storage and scratch space that attacks aim at; checked unchanged after the test."""
    folder = tmp_path / "sentinel"
    folder.mkdir()
    (folder / "keep.txt").write_text("original")
    before = tree(folder)
    yield folder
    assert tree(folder) == before, "an attack wrote outside the storage area"


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where a payload writes when it runs; tests check it is absent after each stage."""
    return tmp_path / "pwned"

