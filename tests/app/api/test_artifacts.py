"""A job's artifacts as the API shows and serves them: the model card and HTML report with their content types and
a policy that keeps a rendered report inert, and a running tune job's provisional best trial."""

import pytest

from app.core.db import make_engine, make_session_factory, session_scope
from app.core.ids import new_id
from app.core.tables import Artifact, Job

FILES = {  # name -> (kind, format, bytes, provisional)
    "m-model-card.md": ("card", "md", b"---\nlibrary_name: onnx\n---\n# m\n", False),
    "m-report.html": ("report", "html", b"<!DOCTYPE html><title>m</title>", False),
    "m-best-so-far-trial2.onnx": ("model", "onnx", b"onnx bytes", True),
}


@pytest.fixture
def job_with_files(client, auth, upload, settings, tmp_path):
    job = client.post("/v1/jobs", headers=auth, json={"model_id": upload().json()["id"], "tune": {}}).json()
    engine = make_engine(settings.resolved_database_url())
    ids = {}
    with session_scope(make_session_factory(engine)) as session:
        tenant_id = session.get(Job, job["id"]).tenant_id
        for name, (kind, fmt, content, provisional) in FILES.items():
            source = tmp_path / name
            source.write_bytes(content)
            key = f"tenants/{tenant_id}/jobs/{job['id']}/{name}"
            client.app.state.storage.put_file(key, source)
            ids[name] = new_id("art")
            session.add(Artifact(id=ids[name], tenant_id=tenant_id, job_id=job["id"], kind=kind, format=fmt,
                                 filename=name, size_bytes=len(content), sha256="0" * 64, storage_key=key,
                                 provisional=provisional))
    engine.dispose()
    return job["id"], ids


def test_artifacts_list_their_kind_format_and_whether_provisional(client, auth, job_with_files):
    job_id, ids = job_with_files
    listed = client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json()["data"]
    assert sorted((a["filename"], a["kind"], a["format"], a["provisional"]) for a in listed) == sorted(
        (name, kind, fmt, provisional) for name, (kind, fmt, _, provisional) in FILES.items())
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["artifacts"] == listed


@pytest.mark.parametrize("name, media_type", [("m-model-card.md", "text/markdown; charset=utf-8"),
                                              ("m-report.html", "text/html; charset=utf-8"),
                                              ("m-best-so-far-trial2.onnx", "application/octet-stream")])
def test_cards_and_html_reports_download_with_their_type_and_an_inert_policy(client, auth, job_with_files, name,
                                                                            media_type):
    _, ids = job_with_files
    response = client.get(f"/v1/artifacts/{ids[name]}/download", headers=auth)
    assert response.status_code == 200 and response.content == FILES[name][2]
    assert response.headers["content-type"] == media_type
    assert response.headers["content-disposition"].startswith(f'attachment; filename="{name}"')
    assert response.headers["x-content-type-options"] == "nosniff"
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "sandbox" in policy and "script" not in policy
