"""Cheap polls: version ETags on jobs, models, datasets and their lists; the fast path before routing; the key and
response caches."""

import time

import pytest
from sqlalchemy import select

from app.api.key_cache import Caller, KeyCache
from app.api.response_cache import ResponseCache
from app.core import jobs
from app.core.db import make_engine, make_session_factory, session_scope
from app.core.tables import Job

RECIPE = {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]}


@pytest.fixture
def factory(settings):
    engine = make_engine(settings.resolved_database_url())
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def job(client, auth, upload) -> dict:
    model = upload().json()
    return client.post("/v1/jobs", headers=auth, json={"model_id": model["id"], "recipe": RECIPE}).json()


def version_of(factory, job_id: str) -> int:
    with factory() as session:
        return session.scalar(select(Job.version).where(Job.id == job_id))


def test_progress_changes_the_etag_and_a_heartbeat_does_not(client, auth, job, factory):
    path = f"/v1/jobs/{job['id']}"
    first = client.get(path, headers=auth)
    with session_scope(factory) as session:
        jobs.claim(session, job["id"], "w1", jobs.stale_cutoff(60))
    running = client.get(path, headers={**auth, "If-None-Match": first.headers["ETag"]})
    assert running.status_code == 200 and running.json()["status"] == "running"
    before = version_of(factory, job["id"])
    with session_scope(factory) as session:
        jobs.heartbeat(session, job["id"], "w1")
    assert version_of(factory, job["id"]) == before
    assert client.get(path, headers={**auth, "If-None-Match": running.headers["ETag"]}).status_code == 304
    with session_scope(factory) as session:
        jobs.set_progress(session, job["id"], "w1", 0.5, "quantize", "half way")
    progressed = client.get(path, headers={**auth, "If-None-Match": running.headers["ETag"]})
    assert progressed.status_code == 200 and progressed.json()["progress"]["fraction"] == 0.5
    assert progressed.headers["ETag"] != running.headers["ETag"]


def test_a_cached_key_and_body_answer_before_routing(client, auth, job):
    """Once the route has built a version's body, the fast path sends those bytes while the version holds: a body
    planted in the cache for the current version is what comes back."""
    path = f"/v1/jobs/{job['id']}"
    built = client.get(path, headers=auth)
    cache: ResponseCache = client.app.state.response_cache
    tenant_id = job_tenant(client, job["id"])
    version = int(built.headers["ETag"].rsplit(".", 1)[1].rstrip('"'))
    assert cache.get(job["id"], tenant_id, version) == built.content
    cache.put(job["id"], tenant_id, version, b'{"planted":true}')
    again = client.get(path, headers=auth)
    assert again.json() == {"planted": True} and again.headers["ETag"] == built.headers["ETag"]
    assert client.get(path, headers={**auth, "If-None-Match": built.headers["ETag"]}).status_code == 304
    # a query string, another method or another tenant's key never takes the fast path
    assert client.get(path + "?x=1", headers=auth).json()["id"] == job["id"]


def job_tenant(client, job_id: str) -> str:
    with client.app.state.session_factory() as session:
        return session.scalar(select(Job.tenant_id).where(Job.id == job_id))


def test_a_database_that_does_not_answer_is_503_on_the_fast_path_too(tmp_path, onnx_bytes):
    """The fast path leaves a database error to the route, whose answer is 503 `database_unavailable`, never a 500
    or a dropped connection (CI's PostgreSQL restart caught that)."""
    from fastapi.testclient import TestClient

    from app.api.main import create_app
    from app.core.config import Settings
    from app.core.migrate import upgrade

    own = Settings(home=tmp_path / "home")
    upgrade(own.resolved_database_url())
    engine = make_engine(own.resolved_database_url())
    with session_scope(make_session_factory(engine)) as session:
        from app.core.auth import create_api_key

        _, key = create_api_key(session, "t")
    engine.dispose()
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(own, housekeeping=False)) as client:
        model = client.post("/v1/models", headers=headers, files={"file": ("m.onnx", onnx_bytes)}).json()
        job = client.post("/v1/jobs", headers=headers, json={"model_id": model["id"], "recipe": RECIPE}).json()
        etag = client.get(f"/v1/jobs/{job['id']}", headers=headers).headers["ETag"]  # key and body cached
        client.app.state.engine.dispose()
        database = own.resolved_home() / "modelpress.db"
        database.rename(database.with_suffix(".gone"))
        database.mkdir()  # SQLite cannot open a folder: every new connection fails
        for extra in ({}, {"If-None-Match": etag}):
            response = client.get(f"/v1/jobs/{job['id']}", headers={**headers, **extra})
            assert response.status_code == 503 and response.json()["error"]["code"] == "database_unavailable"


def test_another_tenants_poll_is_404_on_the_fast_path_too(client, auth, make_key, job):
    path = f"/v1/jobs/{job['id']}"
    etag = client.get(path, headers=auth).headers["ETag"]
    other = make_key()
    assert client.get("/v1/jobs", headers=other).status_code == 200  # the other key is cached now
    for headers in (other, {**other, "If-None-Match": etag}, {**other, "If-None-Match": "*"}):
        response = client.get(path, headers=headers)
        assert response.status_code == 404 and job["id"] in response.json()["error"]["message"]


def test_job_list_etag_changes_with_any_job_on_the_page(client, auth, job, factory):
    listed = client.get("/v1/jobs?limit=5", headers=auth)
    etag = listed.headers["ETag"]
    assert client.get("/v1/jobs?limit=5", headers={**auth, "If-None-Match": etag}).status_code == 304
    assert client.get("/v1/jobs?limit=5&status=queued",
                      headers={**auth, "If-None-Match": etag}).status_code == 304  # the same page
    with session_scope(factory) as session:
        jobs.request_cancel(session, session.get(Job, job["id"]))
    changed = client.get("/v1/jobs?limit=5", headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["data"][0]["status"] == "cancelled"
    assert changed.headers["ETag"] != etag
    assert client.get("/v1/jobs?limit=5&status=queued", headers=auth).json()["data"] == []


def test_a_list_is_made_of_the_jobs_bodies(client, auth, upload):
    """A list page is the jobs' bodies as GET /v1/jobs/{id} sends them (kept by version in the response cache),
    and valid JobsPublic JSON."""
    from app.api.schemas import JobsPublic

    model = upload().json()
    ids = [client.post("/v1/jobs", headers=auth, json={"model_id": model["id"], "recipe": RECIPE}).json()["id"]
           for _ in range(3)]
    listed = client.get("/v1/jobs?limit=2", headers=auth)
    page = JobsPublic.model_validate_json(listed.content)
    assert [job.id for job in page.data] == ids[::-1][:2] and page.next_cursor
    assert listed.json()["data"][0] == client.get(f"/v1/jobs/{ids[-1]}", headers=auth).json()
    single = client.get(f"/v1/jobs/{ids[0]}", headers=auth)
    version = int(single.headers["ETag"].rsplit(".", 1)[1].rstrip('"'))
    client.app.state.response_cache.put(ids[0], job_tenant(client, ids[0]), version, b'{"planted":true}')
    rest = client.get("/v1/jobs", headers=auth, params={"cursor": page.next_cursor}).json()
    assert rest == {"data": [{"planted": True}], "next_cursor": None}


def test_models_and_datasets_have_etags_too(client, auth, upload):
    model = upload().json()
    for path in (f"/v1/models/{model['id']}", "/v1/models", "/v1/datasets"):
        first = client.get(path, headers=auth)
        assert first.status_code == 200 and first.headers["ETag"].startswith('W/"')
        assert client.get(path, headers={**auth, "If-None-Match": first.headers["ETag"]}).status_code == 304
    dataset = client.post("/v1/datasets", headers=auth, files={"file": ("d.jsonl", b'{"text": "a b c"}\n')}).json()
    first = client.get(f"/v1/datasets/{dataset['id']}", headers=auth)
    assert client.get(f"/v1/datasets/{dataset['id']}",
                      headers={**auth, "If-None-Match": first.headers["ETag"]}).status_code == 304


def test_key_cache_entries_end_at_the_ttl_or_the_keys_expiry():
    from datetime import timedelta

    from app.core.db import utcnow

    cache = KeyCache(ttl=0.2)
    caller = Caller(id="ten_1", key_id="key_1")
    cache.store("mp_a_b", caller, None)
    cache.store("mp_c_d", caller, utcnow() - timedelta(seconds=1))
    assert cache.lookup("mp_a_b") == caller and cache.lookup("mp_c_d") is None and cache.lookup("mp_x_y") is None
    time.sleep(0.3)
    assert cache.lookup("mp_a_b") is None
    off = KeyCache(ttl=0)
    off.store("mp_a_b", caller, None)
    assert off.lookup("mp_a_b") is None


def test_response_cache_is_bounded_and_keyed_by_tenant_and_version():
    cache = ResponseCache(max_bytes=10)
    cache.put("job_1", "ten_1", 1, b"12345")
    cache.put("job_2", "ten_1", 1, b"12345")
    assert cache.get("job_1", "ten_1", 1) == b"12345"
    assert cache.get("job_1", "ten_1", 2) is None and cache.get("job_1", "ten_2", 1) is None
    cache.put("job_3", "ten_1", 1, b"123")  # over 10 bytes: the least recently used (job_2) goes
    assert cache.get("job_2", "ten_1", 1) is None and cache.get("job_1", "ten_1", 1) == b"12345"
    cache.put("job_4", "ten_1", 1, b"x" * 11)  # larger than the whole cache: not kept
    assert cache.get("job_4", "ten_1", 1) is None
