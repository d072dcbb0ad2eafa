"""Cross-tenant access, over EVERY /v1 route of the OpenAPI schema: another tenant's ids answer 404.

Routes come from the app's own schema, so a route added later is covered without editing this file; a path
parameter of a kind this test cannot fill fails the test (add a resource of that kind to `tenant_resources`).
"""

import io
import re

import numpy as np
from sqlalchemy import update

from app.core.db import make_engine, make_session_factory, session_scope
from app.core.ids import new_id
from app.core.tables import ApiKey, Artifact, Job

PATH_PARAM = re.compile(r"{(\w+)}")
ARTIFACT_BYTES = b'{"compression_ratio": 2.0}'


def tenant_resources(client, settings, headers, onnx_bytes, tmp_path) -> dict[str, str]:
    """One resource of every kind for a tenant, keyed by the path parameter that names it."""
    model = client.post("/v1/models", headers=headers, files={"file": ("m.onnx", onnx_bytes)}).json()
    arrays = io.BytesIO()
    np.savez(arrays, x=np.zeros((8, 16), dtype=np.float32), labels=np.zeros(8, dtype=np.int64))
    dataset = client.post("/v1/datasets", headers=headers, files={"file": ("d.npz", arrays.getvalue())}).json()
    job = client.post("/v1/jobs", headers=headers, json={
        "model_id": model["id"], "recipe": {"steps": [{"op": "quantize"}]}, "datasets": {"eval": dataset["id"]}
    }).json()
    prefix = headers["Authorization"].split("_")[1]
    artifact_id = new_id("art")
    source = tmp_path / "report.json"
    source.write_bytes(ARTIFACT_BYTES)
    storage_key = f"tenants/x/jobs/{job['id']}/report.json"
    client.app.state.storage.put_file(storage_key, source)
    engine = make_engine(settings.resolved_database_url())
    with session_scope(make_session_factory(engine)) as session:
        key = session.query(ApiKey).filter_by(prefix=prefix).one()
        session.add(Artifact(id=artifact_id, tenant_id=key.tenant_id, job_id=job["id"], kind="report",
                             format="json", filename="report.json", size_bytes=len(ARTIFACT_BYTES),
                             sha256="0" * 64, storage_key=storage_key))
        session.execute(update(Job).where(Job.id == job["id"]).values(metrics={"compression_ratio": 2.0}))
    engine.dispose()
    return {"model_id": model["id"], "dataset_id": dataset["id"], "job_id": job["id"], "artifact_id": artifact_id,
            "key_id": key.id}


def snapshot(client, headers, ids: dict[str, str]) -> dict:
    """Everything the owner can see of its resources."""
    return {
        "model": client.get(f"/v1/models/{ids['model_id']}", headers=headers).json(),
        "model_bytes": client.get(f"/v1/models/{ids['model_id']}/download", headers=headers).content,
        "dataset": client.get(f"/v1/datasets/{ids['dataset_id']}", headers=headers).json(),
        "job": client.get(f"/v1/jobs/{ids['job_id']}", headers=headers).json(),
        "report": client.get(f"/v1/jobs/{ids['job_id']}/report", headers=headers).json(),
        "artifact": client.get(f"/v1/artifacts/{ids['artifact_id']}/download", headers=headers).content,
        "keys": [{k: v for k, v in key.items() if k != "last_used_at"}
                 for key in client.get("/v1/keys", headers=headers).json()["data"]],
    }


def test_every_v1_route_hides_other_tenants_resources(client, settings, make_key, onnx_bytes, tmp_path):
    alice, bob = make_key(), make_key()
    ids = tenant_resources(client, settings, alice, onnx_bytes, tmp_path)
    before = snapshot(client, alice, ids)
    assert before["artifact"] == ARTIFACT_BYTES and before["model_bytes"] == onnx_bytes

    checked = []
    for path, operations in client.app.openapi()["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            names = PATH_PARAM.findall(path)
            unknown = sorted(set(names) - set(ids))
            assert not unknown, (f"{method.upper()} {path}: this test has no resource for path parameter(s) "
                                 f"{unknown}; add one to tenant_resources so the route is covered")
            if names:
                response = client.request(method, path.format(**ids), headers=bob)
                assert response.status_code == 404, f"{method.upper()} {path}: {response.status_code} {response.text}"
                assert response.json()["error"]["code"] == "not_found"
            elif path == "/v1/events":
                continue  # never ends on its own; tests/e2e/test_events.py shows another tenant sees none of it
            elif method == "get":
                # Lists: filters that take an id (GET /v1/jobs?model_id=) get the other tenant's id too.
                query = {p["name"]: ids[p["name"]] for p in operation.get("parameters", [])
                         if p["in"] == "query" and p["name"] in ids}
                response = client.get(path, headers=bob, params=query)
                assert response.status_code == 200, f"GET {path}: {response.status_code}"
                assert not [i for i in ids.values() if i in response.text], f"GET {path} shows another tenant's ids"
            checked.append((method, path))
    assert len(checked) >= 20

    # Routes without an id in the path take ids in the body: creating a job from another tenant's inputs.
    bob_model = client.post("/v1/models", headers=bob, files={"file": ("m.onnx", onnx_bytes)}).json()["id"]
    quantize = {"recipe": {"steps": [{"op": "quantize"}]}}
    for body in ({"model_id": ids["model_id"], **quantize},
                 {"model_id": bob_model, "datasets": {"eval": ids["dataset_id"]}, **quantize}):
        assert client.post("/v1/jobs", headers=bob, json=body).status_code == 404

    assert snapshot(client, alice, ids) == before
    assert client.get("/v1/models", headers=alice).status_code == 200  # alice's key was neither revoked nor rotated
