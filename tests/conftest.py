"""Shared fixtures: real PostgreSQL and Redis from this machine, SQLite and local files for embedded mode.

PostgreSQL/Redis tests skip with a reason on a machine without them, but fail under CI (CI=true).
"""

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.config import Settings
from app.core.migrate import upgrade

# Anything that reads default settings at import time (the worker's Celery app) must not touch the checkout.
os.environ.setdefault("MODELPRESS_HOME", tempfile.mkdtemp(prefix="modelpress-test-home-"))

PG_ADMIN_URL = os.environ.get("MODELPRESS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MODELPRESS_TEST_REDIS", "redis://127.0.0.1:6379")


def _unavailable(what: str, why: Exception | str) -> None:
    message = f"{what} is not reachable ({why}); start it to run these tests"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI requires it)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def create_pg_database() -> str:
    """A fresh, empty PostgreSQL database; returns its plain postgresql:// URL."""
    import psycopg

    name = f"mp_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_pg_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    upgrade(Settings(database_url=url).resolved_database_url())
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    url = f"{REDIS_URL}/{os.environ.get('MODELPRESS_TEST_REDIS_DB', '9')}"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        client.ping()
        client.flushdb()
    except redis.RedisError as exc:
        _unavailable("Redis", exc)
    return url


@pytest.fixture(scope="session")
def sqlite_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("mp-home")
    upgrade(Settings(home=home).resolved_database_url())
    return home


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, sqlite_home, tmp_path) -> Settings:
    """Settings for an in-process API: SQLite or PostgreSQL, filesystem broker, local storage."""
    if request.param == "sqlite":
        return Settings(home=sqlite_home, broker_url=None, storage_url=(tmp_path / "artifacts").as_uri(),
                        max_upload_bytes=5 * 1024 * 1024)
    return Settings(home=tmp_path, database_url=request.getfixturevalue("pg_url"),
                    storage_url=(tmp_path / "artifacts").as_uri(), max_upload_bytes=5 * 1024 * 1024)


@pytest.fixture
def factory(settings):
    """A session factory on the test's database."""
    from app.core.db import make_engine, make_session_factory

    engine = make_engine(settings.resolved_database_url())
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def job_id(factory) -> str:
    """A queued job of a new tenant, with nothing to run."""
    from app.core import jobs
    from app.core.auth import create_api_key
    from app.core.db import session_scope
    from app.core.ids import new_id

    with session_scope(factory) as session:
        tenant, _ = create_api_key(session, new_id("tenant"))
        return jobs.create_job(session, tenant_id=tenant.id, model_id="mdl_x", recipe={"steps": []}, datasets={},
                               target={}, queue="cpu").id
