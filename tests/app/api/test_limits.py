"""Per-tenant limits: request rate (shared through files or Redis, failing open; 304s free), jobs, stored bytes,
event stream slots."""

import io
import logging

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.api import limits
from app.api.limits import FileRateLimiter, check_storage_quota, storage_used
from app.api.main import create_app
from app.core.db import make_engine, make_session_factory, session_scope
from app.core.errors import ServiceError
from app.core.ids import new_id
from app.core.tables import ApiKey, Artifact

QUANTIZE = {"recipe": {"steps": [{"op": "quantize"}]}}


@pytest.fixture
def limited(settings):
    """A client for an app whose settings are the test's settings plus the given limits."""
    clients = []

    def _client(**overrides) -> TestClient:
        client = TestClient(create_app(settings.model_copy(update=overrides), housekeeping=False))
        clients.append(client.__enter__())
        return client

    yield _client
    for client in clients:
        client.__exit__(None, None, None)


def tenant_id(settings, headers) -> str:
    engine = make_engine(settings.resolved_database_url())
    with make_session_factory(engine)() as session:
        key = session.query(ApiKey).filter_by(prefix=headers["Authorization"].split("_")[1]).one()
    engine.dispose()
    return key.tenant_id


def assert_rate_limited(response) -> None:
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 20  # 3 a minute: one token back every 20 s


def test_rate_limit_embedded(limited, make_key):
    client = limited(tenant_requests_per_minute=3, broker_url=None)
    alice, bob = make_key(), make_key()
    for _ in range(3):
        assert client.get("/v1/models", headers=alice).status_code == 200
    assert_rate_limited(client.get("/v1/models", headers=alice))
    assert_rate_limited(client.post("/v1/keys", headers=alice))  # every /v1 route, whatever its method
    assert client.get("/v1/models", headers=bob).status_code == 200  # per tenant
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer mp_x_y"}).status_code == 401


def test_token_bucket_refills(monkeypatch, tmp_path):
    now = [1000.0]
    monkeypatch.setattr(limits.time, "time", lambda: now[0])
    limiter = FileRateLimiter(tmp_path, 60)
    assert all(limiter.acquire("t") == 0 for _ in range(60))
    assert limiter.acquire("t") == pytest.approx(1.0)
    now[0] += 1.0
    assert limiter.acquire("t") == 0
    assert limiter.acquire("t") > 0


def test_rate_limit_is_shared_by_the_processes_of_one_home(limited, make_key, settings):
    """Two apps on one MODELPRESS_HOME stand for `serve --workers 2`: the bucket is a file they both lock."""
    first = limited(tenant_requests_per_minute=3, broker_url=None)
    second = limited(tenant_requests_per_minute=3, broker_url=None)
    assert isinstance(first.app.state.rate_limiter, FileRateLimiter)
    headers = make_key()
    assert first.get("/v1/models", headers=headers).status_code == 200
    assert second.get("/v1/models", headers=headers).status_code == 200
    assert first.get("/v1/models", headers=headers).status_code == 200
    assert_rate_limited(second.get("/v1/models", headers=headers))
    assert_rate_limited(first.get("/v1/models", headers=headers))


def test_not_modified_answers_are_not_charged(limited, make_key, onnx_bytes):
    """A poller sending back the ETag gets 304s without spending its rate; a changed or unconditional answer is
    charged."""
    client = limited(tenant_requests_per_minute=4, broker_url=None)
    headers = make_key()
    model = client.post("/v1/models", headers=headers, files={"file": ("m.onnx", onnx_bytes)}).json()
    job = client.post("/v1/jobs", headers=headers, json={"model_id": model["id"], **QUANTIZE})
    first = client.get(f"/v1/jobs/{job.json()['id']}", headers=headers)
    listed = client.get("/v1/jobs", headers=headers)
    for _ in range(10):  # the key is cached now: these go through the fast path, then the route for the list
        assert client.get(f"/v1/jobs/{job.json()['id']}",
                          headers={**headers, "If-None-Match": first.headers["ETag"]}).status_code == 304
        assert client.get("/v1/jobs", headers={**headers, "If-None-Match": listed.headers["ETag"]}).status_code == 304
    assert_rate_limited(client.get("/v1/jobs", headers=headers))  # 4 charged: upload, submit, get, list


def test_a_missing_resource_is_charged(limited, make_key):
    """A 404 of a conditional GET costs a token: probing for ids is rate limited like everything else."""
    client = limited(tenant_requests_per_minute=3, broker_url=None)
    headers = {**make_key(), "If-None-Match": "*"}
    for path in ("/v1/jobs/job_0123456789abcdef01234567", "/v1/models/mdl_0123456789abcdef01234567",
                 "/v1/jobs/job_0123456789abcdef01234567"):
        assert client.get(path, headers=headers).status_code == 404
    assert_rate_limited(client.get("/v1/datasets/ds_0123456789abcdef01234567", headers=headers))


def test_rate_limit_is_shared_through_redis(limited, make_key, redis_url):
    """Two apps stand for two API processes: the bucket lives in Redis, not in either of them."""
    first = limited(tenant_requests_per_minute=3, broker_url=redis_url)
    second = limited(tenant_requests_per_minute=3, broker_url=redis_url)
    assert isinstance(first.app.state.rate_limiter, limits.RedisRateLimiter)
    headers = make_key()
    assert first.get("/v1/models", headers=headers).status_code == 200
    assert second.get("/v1/models", headers=headers).status_code == 200
    assert first.get("/v1/models", headers=headers).status_code == 200
    assert_rate_limited(second.get("/v1/models", headers=headers))
    assert_rate_limited(first.get("/v1/models", headers=headers))
    assert second.get("/v1/models", headers=make_key()).status_code == 200


def test_redis_outage_fails_open(limited, make_key, caplog):
    client = limited(tenant_requests_per_minute=1, broker_url="redis://127.0.0.1:1/0")
    headers = make_key()
    with caplog.at_level(logging.WARNING, logger="app.api.limits"):
        for _ in range(5):
            assert client.get("/v1/models", headers=headers).status_code == 200
    warnings = [r for r in caplog.records if r.name == "app.api.limits"]
    assert len(warnings) == 1 and "Redis unavailable" in warnings[0].getMessage()


def test_zero_means_unlimited(limited, make_key):
    client = limited(tenant_requests_per_minute=0, tenant_max_active_jobs=0, tenant_max_storage_bytes=0)
    assert client.app.state.rate_limiter is None
    headers = make_key()
    assert all(client.get("/v1/presets", headers=headers).status_code == 200 for _ in range(20))


def test_active_jobs_limit(limited, make_key, onnx_bytes):
    client = limited(tenant_max_active_jobs=2)
    headers = make_key()
    model = client.post("/v1/models", headers=headers, files={"file": ("m.onnx", onnx_bytes)}).json()
    body = {"model_id": model["id"], **QUANTIZE}
    first = client.post("/v1/jobs", headers={**headers, "Idempotency-Key": "one"}, json=body)
    assert first.status_code == 201
    assert client.post("/v1/jobs", headers=headers, json=body).status_code == 201
    refused = client.post("/v1/jobs", headers=headers, json=body)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
    replay = client.post("/v1/jobs", headers={**headers, "Idempotency-Key": "one"}, json=body)
    assert replay.status_code == 201 and replay.json()["id"] == first.json()["id"]
    assert client.post("/v1/jobs", headers=make_key(), json=body).status_code == 404  # other tenants unaffected

    assert client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=headers).status_code == 202
    assert client.post("/v1/jobs", headers=headers, json=body).status_code == 201


def chunked_upload(client, headers, data: bytes):
    """A multipart upload without Content-Length (chunked), so only the streamed size can be checked."""
    boundary = "quota-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def body():
        yield head
        for start in range(0, len(data), 4096):
            yield data[start:start + 4096]
        yield f"\r\n--{boundary}--\r\n".encode()

    return client.post("/v1/models", headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
                       content=body())


def assert_quota_exceeded(response) -> None:
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "quota_exceeded"


def test_storage_quota(limited, settings, make_key, onnx_bytes):
    quota = len(onnx_bytes) + 1000
    client = limited(tenant_max_storage_bytes=quota)
    headers = make_key()
    model = client.post("/v1/models", headers=headers, files={"file": ("m.onnx", onnx_bytes)})
    assert model.status_code == 201
    assert_quota_exceeded(client.post("/v1/models", headers=headers, files={"file": ("m.onnx", onnx_bytes)}))
    assert_quota_exceeded(chunked_upload(client, headers, onnx_bytes))
    big = client.post("/v1/models", headers=headers, files={"file": ("big.onnx", b"\0" * (quota + 128 * 1024))})
    assert_quota_exceeded(big)  # refused on its declared Content-Length
    arrays = io.BytesIO()
    np.savez(arrays, x=np.zeros((400, 4), dtype=np.float32))
    assert_quota_exceeded(client.post("/v1/datasets", headers=headers, files={"file": ("d.npz", arrays.getvalue())}))
    assert client.post("/v1/models", headers=make_key(), files={"file": ("m.onnx", onnx_bytes)}).status_code == 201

    assert client.delete(f"/v1/models/{model.json()['id']}", headers=headers).status_code == 204
    assert client.post("/v1/models", headers=headers, files={"file": ("m.onnx", onnx_bytes)}).status_code == 201


def test_quota_counts_artifacts_and_checks_the_real_size(limited, settings, make_key, onnx_bytes):
    client = limited()
    headers = make_key()
    model = client.post("/v1/models", headers=headers, files={"file": ("m.onnx", onnx_bytes)}).json()
    job = client.post("/v1/jobs", headers=headers, json={"model_id": model["id"], **QUANTIZE}).json()
    tenant = tenant_id(settings, headers)
    engine = make_engine(settings.resolved_database_url())
    with session_scope(make_session_factory(engine)) as session:
        session.add(Artifact(id=new_id("art"), tenant_id=tenant, job_id=job["id"], kind="model", format="onnx",
                             filename="m.onnx", size_bytes=5000, sha256="0" * 64, storage_key="k"))
    with session_scope(make_session_factory(engine)) as session:
        assert storage_used(session, tenant) == len(onnx_bytes) + 5000
        check_storage_quota(session, tenant, 10, len(onnx_bytes) + 5010)
        with pytest.raises(ServiceError) as refused:
            check_storage_quota(session, tenant, 11, len(onnx_bytes) + 5010)
    engine.dispose()
    assert (refused.value.status_code, refused.value.code) == (413, "quota_exceeded")


def test_deleting_a_jobs_outputs_frees_its_quota(limited, settings, make_key, onnx_bytes, finish_job):
    quota = 2 * len(onnx_bytes) + 500
    client = limited(tenant_max_storage_bytes=quota)
    headers = make_key()
    model = client.post("/v1/models", headers=headers, files={"file": ("m.onnx", onnx_bytes)}).json()
    job = client.post("/v1/jobs", headers=headers, json={"model_id": model["id"], **QUANTIZE}).json()
    finish_job(job["id"], size=300)  # a model and a report of 300 bytes each: the second upload no longer fits
    assert_quota_exceeded(client.post("/v1/models", headers=headers, files={"file": ("m.onnx", onnx_bytes)}))

    assert client.delete(f"/v1/jobs/{job['id']}", headers=headers).status_code == 204
    engine = make_engine(settings.resolved_database_url())
    with make_session_factory(engine)() as session:
        assert storage_used(session, tenant_id(settings, headers)) == len(onnx_bytes)
    engine.dispose()
    assert client.post("/v1/models", headers=headers, files={"file": ("m.onnx", onnx_bytes)}).status_code == 201


def stream_slots(kind: str, request, limit: int, lease_seconds: float) -> limits.StreamSlots:
    if kind == "redis":
        return limits.RedisStreamSlots(request.getfixturevalue("redis_url"), limit, lease_seconds)
    return limits.FileStreamSlots(request.getfixturevalue("tmp_path"), limit, lease_seconds)


@pytest.mark.parametrize("kind", ["files", "redis"])
def test_stream_slots_per_tenant_freed_on_release(kind, request):
    """Event stream slots: the limit per tenant, a held slot renewed whatever the count, a freed slot reusable."""
    slots = stream_slots(kind, request, 2, lease_seconds=60)
    tenant, other = new_id("tenant"), new_id("tenant")
    assert slots.acquire(tenant, "a") and slots.acquire(tenant, "b")
    assert not slots.acquire(tenant, "c")
    assert slots.acquire(other, "a")  # another tenant's slots are its own
    slots.renew(tenant, "a")
    assert slots.acquire(tenant, "a")  # a stream holding a slot keeps it
    slots.release(tenant, "a")
    assert slots.acquire(tenant, "c")
    assert not slots.acquire(tenant, "d")


@pytest.mark.parametrize("kind", ["files", "redis"])
def test_shared_stream_slots_expire_when_no_longer_renewed(kind, request):
    """A process that died holding slots does not hold them past their lease."""
    import time

    slots = stream_slots(kind, request, 1, lease_seconds=0.3)
    tenant = new_id("tenant")
    assert slots.acquire(tenant, "dead") and not slots.acquire(tenant, "new")
    time.sleep(0.5)
    assert slots.acquire(tenant, "new")


def test_stream_slots_fail_open_when_redis_is_down(caplog):
    slots = limits.RedisStreamSlots("redis://127.0.0.1:1/0", 1, lease_seconds=60)
    with caplog.at_level(logging.WARNING):
        assert slots.acquire("t", "a") and slots.acquire("t", "b")
    assert "Redis unavailable" in caplog.text
