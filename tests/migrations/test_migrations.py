"""The Alembic migrations and the ORM models describe the same schema, on SQLite and on PostgreSQL."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.core.config import Settings
from app.core.db import Base, make_engine
from app.core.migrate import upgrade
from tests.conftest import create_pg_database, drop_pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_database_url(request, tmp_path):
    if request.param == "sqlite":
        yield Settings(home=tmp_path).resolved_database_url()
        return
    url = create_pg_database()
    yield Settings(database_url=url).resolved_database_url()
    drop_pg_database(url)


def test_migrations_match_models(fresh_database_url):
    upgrade(fresh_database_url)
    engine = make_engine(fresh_database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        tables = set(inspect(conn).get_table_names())
    engine.dispose()
    assert diff == [], diff
    assert {"tenants", "api_keys", "models", "jobs", "job_events", "artifacts"} <= tables


def test_upgrade_twice_is_a_no_op(fresh_database_url):
    upgrade(fresh_database_url)
    upgrade(fresh_database_url)
