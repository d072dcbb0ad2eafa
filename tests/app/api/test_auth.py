import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app

ROUTES = [("get", "/v1/models"), ("post", "/v1/models"), ("get", "/v1/models/x"), ("get", "/v1/models/x/download"),
          ("delete", "/v1/models/x"), ("get", "/v1/jobs"), ("post", "/v1/jobs"), ("get", "/v1/jobs/x"),
          ("post", "/v1/jobs/x/cancel"), ("delete", "/v1/jobs/x"),
          ("get", "/v1/jobs/x/events"), ("get", "/v1/events"),
          ("get", "/v1/jobs/x/report"), ("get", "/v1/jobs/x/artifacts"),
          ("get", "/v1/artifacts/x/download"), ("get", "/v1/datasets"), ("post", "/v1/datasets"),
          ("get", "/v1/datasets/x"), ("delete", "/v1/datasets/x"), ("get", "/v1/presets"), ("get", "/v1/keys"),
          ("post", "/v1/keys"), ("post", "/v1/keys/x/revoke"), ("post", "/v1/keys/x/rotate"),
          ("get", "/v1/jobs/x/webhook-deliveries"), ("get", "/v1/webhooks/secret"),
          ("post", "/v1/webhooks/secret/rotate"), ("get", "/v1/webhooks/deliveries")]


@pytest.mark.parametrize("method, path", ROUTES)
def test_every_v1_route_needs_a_key(client, method, path):
    assert getattr(client, method)(path).status_code == 401
    response = getattr(client, method)(path, headers={"Authorization": "Bearer mp_nothing_here"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def test_every_v1_route_is_covered(client):
    schema = client.app.openapi()["paths"]
    paths = {(m, p) for p, ops in schema.items() if p.startswith("/v1") for m in ops}
    covered = {(m, p.replace("/x", "/{id}")) for m, p in ROUTES}
    normalised = {(m, p.replace("{model_id}", "{id}").replace("{job_id}", "{id}").replace("{artifact_id}", "{id}")
                  .replace("{dataset_id}", "{id}").replace("{key_id}", "{id}"))
                  for m, p in paths}
    assert normalised == covered


def test_other_tenants_resources_are_404(client, make_key, upload):
    alice, bob = make_key(), make_key()
    model = upload(headers=alice).json()
    job = client.post("/v1/jobs", headers=alice, json={"model_id": model["id"], "recipe": {
        "steps": [{"op": "quantize"}]}}).json()
    for path in (f"/v1/models/{model['id']}", f"/v1/models/{model['id']}/download", f"/v1/jobs/{job['id']}",
                 f"/v1/jobs/{job['id']}/report", f"/v1/jobs/{job['id']}/artifacts"):
        response = client.get(path, headers=bob)
        assert response.status_code == 404, path
    assert client.delete(f"/v1/models/{model['id']}", headers=bob).status_code == 404
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=bob).status_code == 404
    assert client.post("/v1/jobs", headers=bob, json={"model_id": model["id"], "recipe": {
        "steps": [{"op": "quantize"}]}}).status_code == 404
    assert client.get("/v1/models", headers=bob).json()["data"] == []
    assert client.get("/v1/jobs", headers=bob).json()["data"] == []
    assert client.get(f"/v1/models/{model['id']}", headers=alice).status_code == 200


def test_key_revoked_elsewhere_is_401_within_the_cache_ttl(settings, make_key):
    """A key revoked by another process (here: straight in the database, as `modelpress keys revoke` does) is
    refused once the key cache's entry is older than MODELPRESS_AUTH_CACHE_SECONDS."""
    import time

    from sqlalchemy import update

    from app.core.db import make_engine, make_session_factory, session_scope, utcnow
    from app.core.tables import ApiKey

    headers = make_key()
    with TestClient(create_app(settings.model_copy(update={"auth_cache_seconds": 0.5}),
                               housekeeping=False)) as client:
        assert client.get("/v1/models", headers=headers).status_code == 200
        prefix = headers["Authorization"].split("_")[1]
        with session_scope(make_session_factory(make_engine(settings.resolved_database_url()))) as session:
            session.execute(update(ApiKey).where(ApiKey.prefix == prefix).values(revoked_at=utcnow()))
        time.sleep(0.6)
        assert client.get("/v1/models", headers=headers).status_code == 401
        assert client.get("/v1/jobs/job_0123456789abcdef01234567", headers=headers).status_code == 401


def test_key_revoked_through_the_api_is_401_at_once(client, make_key):
    headers = make_key()
    other = client.post("/v1/keys", headers=headers).json()
    other_headers = {"Authorization": f"Bearer {other['key']}"}
    assert client.get("/v1/jobs", headers=other_headers).status_code == 200  # cached now
    assert client.post(f"/v1/keys/{other['id']}/revoke", headers=headers).status_code == 200
    assert client.get("/v1/jobs", headers=other_headers).status_code == 401


def test_keys_are_stored_hashed(settings, make_key):
    from sqlalchemy import select

    from app.core.db import make_engine, make_session_factory
    from app.core.tables import ApiKey

    key = make_key()["Authorization"].removeprefix("Bearer ")
    with make_session_factory(make_engine(settings.resolved_database_url()))() as session:
        rows = session.scalars(select(ApiKey)).all()
    assert all(key not in (r.key_hash, r.prefix) and len(r.key_hash) == 64 for r in rows)
