"""Schemathesis against the service's own OpenAPI schema, over real HTTP: no 5xx, and every answer documented.

MODELPRESS_FUZZ_EXAMPLES sets the examples per operation (default 25: well under a minute in all); raise it
for a longer run, e.g. `MODELPRESS_FUZZ_EXAMPLES=1000 pytest tests/app/api/test_fuzz.py`.
"""

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.api.main import create_app
from app.core.auth import create_api_key
from app.core.config import Settings
from app.core.db import make_engine, make_session_factory, session_scope
from app.core.migrate import upgrade
from tests.conftest import create_pg_database, drop_pg_database, free_port

EXAMPLES = int(os.environ.get("MODELPRESS_FUZZ_EXAMPLES", "25"))


@dataclass
class Server:
    url: str
    headers: dict[str, str]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory) -> Iterator[Server]:
    """The real app under uvicorn on a free port, over a fresh database (SQLite, or a PostgreSQL database of its own:
    NUL bytes and non-finite numbers fail only there), with one tenant's key."""
    home = tmp_path_factory.mktemp("fuzz-home")
    database_url = create_pg_database() if request.param == "postgresql" else None
    # No rate limit: the fuzzer sends far more than a tenant's default budget, and a 429 would hide the answer.
    app_settings = Settings(home=home, database_url=database_url, broker_url=None, max_upload_bytes=1024 * 1024,
                            tenant_requests_per_minute=0)
    upgrade(app_settings.resolved_database_url())
    engine = make_engine(app_settings.resolved_database_url())
    with session_scope(make_session_factory(engine)) as session:
        _, key = create_api_key(session, "fuzz")
    engine.dispose()
    port = free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(create_app(app_settings, housekeeping=False), host="127.0.0.1",
                                                   port=port, log_config=None, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield Server(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"})
    uvicorn_server.should_exit = True
    thread.join(timeout=10)
    if database_url is not None:
        drop_pg_database(database_url)


# The schema is the app's own, loaded at import so that pytest can make one test per operation (schemathesis's
# lazy `from_fixture` loader does not work with pytest 9); test_served_schema_is_the_fuzzed_one checks it is the
# document the server serves. Only the schema comes from here: every call goes over HTTP to the server.
schema = schemathesis.openapi.from_dict(create_app(Settings(), housekeeping=False).openapi())
# The key is sent with every call (below); generated Authorization values would only ever be refused. The
# ignored_auth check still sends each operation without a key and with a wrong one, and wants them refused.
schema.config.generation.update(with_security_parameters=False)
# The tenant's event stream never ends, so a call to it never returns (tests/e2e/test_events.py covers it; a job's
# stream, fuzzed with ids of no job, answers at once).
schema = schema.exclude(method="GET", path="/v1/events")


def test_served_schema_is_the_fuzzed_one(server):
    assert httpx.get(f"{server.url}/openapi.json").json() == schema.raw_schema


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_api_conforms_to_its_schema(case, server):
    # Every check but positive_data_acceptance, which wants 2xx for any schema-valid request: no schema can say
    # "a cursor this service returned", "a real ONNX file" or "a recipe, a preset or tune", so those get 4xx.
    case.call_and_validate(base_url=server.url, headers=server.headers, excluded_checks=[positive_data_acceptance])
