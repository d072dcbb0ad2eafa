import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.core.config import Settings


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.json()
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_readyz_is_503_when_database_is_down(tmp_path):
    settings = Settings(home=tmp_path, database_url="postgresql://nobody@127.0.0.1:1/none")
    with TestClient(create_app(settings, housekeeping=False)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"].startswith("unavailable")
    assert response.json()["queues_without_workers"] is None


def test_readyz_is_503_when_broker_is_down(tmp_path):
    settings = Settings(home=tmp_path, broker_url="redis://127.0.0.1:1/0")
    from app.core.migrate import upgrade

    upgrade(settings.resolved_database_url())
    with TestClient(create_app(settings, housekeeping=False)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"].startswith("unavailable")
    assert response.json()["checks"]["database"] == "ok"


def test_api_answers_503_not_500_when_database_is_down(tmp_path):
    settings = Settings(home=tmp_path, database_url="postgresql://nobody@127.0.0.1:1/none")
    with TestClient(create_app(settings, housekeeping=False)) as client:
        response = client.get("/v1/models", headers={"Authorization": "Bearer mp_abc_def"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "database_unavailable"


def test_metrics_exports_requests_and_jobs(client, auth):
    client.get("/v1/models", headers=auth)
    client.get("/v1/models/mdl_missing", headers=auth)
    text = client.get("/metrics").text
    assert 'modelpress_http_requests_total{method="GET",route="/v1/models",status="200"}' in text
    assert 'route="/v1/models/{model_id}",status="404"' in text
    assert "modelpress_http_request_duration_seconds_bucket" in text
    assert 'modelpress_jobs{status="queued"}' in text
    assert "modelpress_job_duration_seconds_bucket" in text
    assert "modelpress_job_queue_wait_seconds_bucket" in text


def test_openapi_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/v1/jobs/{job_id}/cancel" in schema["paths"]


def test_unknown_route_uses_error_shape(client):
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_api_process_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from app.api.main import create_app; create_app(); "
            "bad = [m for m in ('torch', 'onnxruntime', 'transformers', 'onnx') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_needs_the_token_when_one_is_set(settings):
    with TestClient(create_app(settings.model_copy(update={"metrics_token": "s3cret-token"}),
                               housekeeping=False)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            refused = client.get("/metrics", headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
            assert refused.headers["www-authenticate"] == "Bearer"
            assert "modelpress_" not in refused.text
        allowed = client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
        assert allowed.status_code == 200 and "modelpress_http_requests_total" in allowed.text
        assert client.get("/healthz").status_code == 200  # only /metrics is guarded


def test_metrics_labels_never_carry_request_values(client, settings, auth):
    """Labels come from fixed sets: no tenant, id or key from a request, and no method a client made up (each new
    label value is a new series held in memory for good)."""
    from app.core.db import make_engine, make_session_factory
    from app.core.tables import ApiKey

    prefix = auth["Authorization"].split("_")[1]
    with make_session_factory(make_engine(settings.resolved_database_url()))() as session:
        tenant_id = session.query(ApiKey).filter_by(prefix=prefix).one().tenant_id
    client.get(f"/v1/models/mdl_{tenant_id}", headers=auth)
    client.get(f"/v1/{tenant_id}", headers=auth)
    client.request("TENANTSMUGGLE", "/v1/models", headers=auth)
    text = client.get("/metrics").text
    assert tenant_id not in text and prefix not in text and "TENANTSMUGGLE" not in text
    assert 'method="OTHER"' in text
    assert 'route="/v1/models/{model_id}",status="404"' in text and 'route="unmatched",status="404"' in text


@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/v1/models", "GET, POST"),
    ("OPTIONS", "/v1/models/mdl_x", "DELETE, GET"),
    ("DELETE", "/v1/jobs", "GET, POST"),
    ("GET", "/v1/keys/key_x/revoke", "POST"),
    ("POST", "/healthz", "GET"),
])
def test_405_lists_every_method_the_path_takes(client, auth, method, path, allowed):
    response = client.request(method, path, headers=auth)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == allowed


def test_readyz_lists_the_queues_no_worker_serves(client, no_workers):
    from datetime import timedelta

    from sqlalchemy import update

    from app.core import presence
    from app.core.db import session_scope, utcnow
    from app.core.tables import QueueHeartbeat

    ready = client.get("/readyz")
    assert (ready.status_code, ready.json()["queues_without_workers"]) == (200, ["cpu", "gpu"])
    with session_scope(no_workers) as session:
        presence.record(session, "cpu-1@host", ["cpu"])
    ready = client.get("/readyz")
    assert (ready.status_code, ready.json()["status"]) == (200, "ready")  # an unserved queue is information
    assert ready.json()["queues_without_workers"] == ["gpu"]
    with session_scope(no_workers) as session:  # the worker stopped beating longer ago than heartbeat_timeout
        session.execute(update(QueueHeartbeat).values(seen_at=utcnow() - timedelta(minutes=2)))
    assert client.get("/readyz").json()["queues_without_workers"] == ["cpu", "gpu"]
