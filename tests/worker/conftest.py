"""Run worker code in this process against a real SQLite database and local storage."""

from pathlib import Path

import pytest

from app.core.auth import create_api_key
from app.core.config import Settings, get_settings
from app.core.db import make_engine, make_session_factory, session_scope
from app.core.ids import new_id
from app.core.jobs import create_job
from app.core.migrate import upgrade
from app.core.storage import open_storage
from app.core.tables import Model


@pytest.fixture
def worker_env(tmp_path, monkeypatch) -> Settings:
    from worker import resources

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODELPRESS_LATENCY_RUNS", "10")
    monkeypatch.setenv("MODELPRESS_HEARTBEAT_INTERVAL", "0.2")
    get_settings.cache_clear()
    resources._resources.cache_clear()
    settings = get_settings()
    upgrade(settings.resolved_database_url())
    yield settings
    get_settings.cache_clear()
    resources._resources.cache_clear()


@pytest.fixture
def db(worker_env):
    engine = make_engine(worker_env.resolved_database_url())
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def add_model(worker_env, db):
    """Store a model file and its row, as an upload would."""
    storage = open_storage(worker_env.resolved_storage_url())

    def _add(path: Path, fmt: str, status: str = "uploaded") -> Model:
        with session_scope(db) as session:
            tenant, _ = create_api_key(session, new_id("tenant"))
            model_id = new_id("mdl")
            key = f"tenants/{tenant.id}/models/{model_id}/model.{fmt}"
            storage.put_file(key, path)
            model = Model(id=model_id, tenant_id=tenant.id, name=path.name, format=fmt,
                          size_bytes=path.stat().st_size, sha256="0" * 64, storage_key=key, status=status)
            session.add(model)
        return model

    return _add


@pytest.fixture
def add_job(db):
    def _add(model: Model, steps=None, device: str = "cpu", runtime: str = "onnxruntime",
             datasets: dict | None = None, **fields) -> str:
        with session_scope(db) as session:
            job = create_job(session, tenant_id=model.tenant_id, model_id=model.id,
                             recipe={"steps": steps or [{"op": "quantize", "method": "dynamic", "dtype": "int8",
                                                         "granularity": "per_channel", "exclude": []}]},
                             datasets=datasets or {}, target={"runtime": runtime, "device": device},
                             queue="gpu" if device == "cuda" else "cpu", **fields)
            return job.id

    return _add


@pytest.fixture
def add_dataset(worker_env, db):
    """Store an .npz dataset and its row, as an upload would."""
    import numpy as np

    from app.core.tables import Dataset

    storage = open_storage(worker_env.resolved_storage_url())

    def _add(model: Model, path: Path, **arrays) -> str:
        np.savez(path, **arrays)
        with session_scope(db) as session:
            dataset_id = new_id("ds")
            key = f"tenants/{model.tenant_id}/datasets/{dataset_id}/data.npz"
            storage.put_file(key, path)
            first = next(iter(arrays.values()))
            session.add(Dataset(id=dataset_id, tenant_id=model.tenant_id, name=path.name, format="npz",
                                size_bytes=path.stat().st_size, sha256="0" * 64, storage_key=key,
                                num_samples=len(first), has_labels="labels" in arrays, info={}))
        return dataset_id

    return _add


@pytest.fixture
def db_job_tune(db):
    """Turn a job into a tuning job (as POST /v1/jobs with `tune` would store it)."""
    from sqlalchemy import update

    from app.core.tables import Job

    def _set(job_id: str, tune: dict, keep_recipe: bool = False) -> None:
        with session_scope(db) as session:
            values = {"tune": tune} if keep_recipe else {"tune": tune, "recipe": None}
            session.execute(update(Job).where(Job.id == job_id).values(**values))

    return _set
