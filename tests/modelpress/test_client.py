"""`modelpress.Client` against a real service (upload -> submit -> wait -> download, resumed downloads, errors), and
against a scripted server for retries."""

import hashlib
import json

import httpx
import pytest

from modelpress import ApiError, Client, Job
from tests.conftest import free_port
from tests.modelpress.conftest import send_json

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(service):
    with Client(service.url, service.key, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def finished(client, model_file, eval_file, tmp_path_factory) -> dict:
    """One int8 job run through the client, with everything it reported on the way."""
    sent: list[tuple[int, int | None]] = []
    model = client.upload_model(model_file, name="mlp", progress=lambda done, total: sent.append((done, total)))
    uploaded_status = model.status
    model = client.wait_for_model(model, timeout=120)
    dataset = client.upload_dataset(eval_file)
    updates = []
    job = client.submit(model, preset="int8-cpu", datasets={"eval": dataset}, name="client test")
    submitted = job
    job = client.wait(job, on_progress=updates.append, timeout=240)
    folder = tmp_path_factory.mktemp("downloads")
    return {"model": model, "uploaded_status": uploaded_status, "sent": sent, "dataset": dataset,
            "submitted": submitted, "job": job, "updates": updates, "paths": client.download(job, folder)}


def test_upload_submit_wait_download(client, finished, model_file, eval_file) -> None:
    model, job = finished["model"], finished["job"]
    assert finished["uploaded_status"] == "uploaded" and model.status == "ready", model
    assert model.name == "mlp" and model.size_bytes == model_file.stat().st_size
    assert finished["sent"][-1] == (model_file.stat().st_size, model_file.stat().st_size)
    assert finished["dataset"].num_samples == 32 and finished["dataset"].has_labels
    assert client.get_dataset(finished["dataset"].id) == finished["dataset"]

    assert finished["submitted"].status == "queued" and finished["submitted"].name == "client test"
    assert job.status == "succeeded", job.error
    assert job.finished and job.datasets["eval"] == finished["dataset"].id
    assert finished["updates"] and finished["updates"][-1].status == "succeeded"
    report = client.report(job)
    assert report == job.metrics
    assert report["compressed"]["size_bytes"] < report["baseline"]["size_bytes"]
    assert report["baseline"]["accuracy"] is not None

    paths = finished["paths"]
    assert sorted((a.kind, a.format) for a in job.artifacts) == [("card", "md"), ("model", "onnx"), ("report", "html"),
                                                                 ("report", "json")]
    for artifact in job.artifacts:
        path = next(p for p in paths if p.name == artifact.filename)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact.sha256
    report_file = next(p for p in paths if p.suffix == ".json")
    assert json.loads(report_file.read_text())["compression_ratio"] == report["compression_ratio"]

    assert job.id in [j.id for j in client.list_jobs(model=model)]
    assert client.get_job(job.id) == job
    assert model.id in [m.id for m in client.list_models(status="ready")]


def test_a_truncated_download_is_resumed_with_range(client, finished) -> None:
    artifact = next(a for a in finished["job"].artifacts if a.kind == "model")
    path = next(p for p in finished["paths"] if p.name == artifact.filename)
    whole = path.read_bytes()
    exchanges = []
    client.http.event_hooks["response"].append(
        lambda response: exchanges.append((response.request.headers.get("range"), response.status_code)))
    try:
        with open(path, "r+b") as fh:
            fh.truncate(len(whole) // 3)
        assert client.download(artifact, path.parent) == path
        assert path.read_bytes() == whole
        assert exchanges == [(f"bytes={len(whole) // 3}-", 206)]

        exchanges.clear()
        assert client.download(artifact, path.parent) == path  # complete and verified: nothing is fetched
        assert exchanges == []

        path.write_bytes(b"x" * 10)  # not this artifact's beginning: resumed, found wrong, fetched again whole
        assert client.download(artifact, path.parent) == path
        assert path.read_bytes() == whole
        assert exchanges == [("bytes=10-", 206), (None, 200)]
    finally:
        client.http.event_hooks["response"].clear()


def test_errors_carry_the_services_code_message_and_status(client, finished) -> None:
    with pytest.raises(ApiError) as missing:
        client.get_model("mdl_00000000000000000000")
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert "mdl_00000000000000000000" in missing.value.message

    with pytest.raises(ApiError) as refused:
        client.submit(finished["model"], recipe={"steps": [{"op": "quantize", "dtype": "int3"}]})
    assert (refused.value.status, refused.value.code) == (422, "invalid_request")
    assert "recipe.steps.0" in refused.value.message and "dtype" in refused.value.message

    with pytest.raises(ApiError) as finished_already:
        client.cancel(finished["job"])
    assert (finished_already.value.status, finished_already.value.code) == (409, "job_finished")


def test_a_bad_key_is_refused_with_401(service) -> None:
    with Client(service.url, "mp_wrong") as client, pytest.raises(ApiError) as refused:
        client.list_models()
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")


def _job(status: str = "queued") -> dict:
    return {"id": "job_1", "model_id": "mdl_1", "status": status, "progress": {"fraction": 0, "step": None,
                                                                               "message": None}}


def test_429_is_retried_after_retry_after(scripted) -> None:
    def respond(handler, seen):
        if not seen:
            send_json(handler, 429, {"error": {"code": "rate_limited", "message": "slow down"}}, {"Retry-After": "1"})
        else:
            send_json(handler, 201, _job())

    server = scripted(respond)
    with Client(server.url, "key") as client:
        job = client.submit("mdl_1", preset="int8-cpu")
    assert isinstance(job, Job) and job.id == "job_1"
    first, second = server.seen
    assert first.path == second.path == "/v1/jobs"
    assert second.at - first.at >= 0.95  # it waited what Retry-After said


@pytest.mark.parametrize("status, code", [(429, "rate_limited"), (503, "database_unavailable")])
def test_retries_are_bounded(scripted, status, code) -> None:
    server = scripted(lambda handler, seen: send_json(handler, status, {"error": {"code": code, "message": "no"}},
                                                      {"Retry-After": "0"}))
    with Client(server.url, "key", max_retries=2) as client, pytest.raises(ApiError) as refused:
        client.list_jobs()
    assert (refused.value.status, refused.value.code, refused.value.message) == (status, code, "no")
    assert len(server.seen) == 3


def test_a_wait_longer_than_allowed_is_not_made(scripted) -> None:
    server = scripted(lambda handler, seen: send_json(
        handler, 429, {"error": {"code": "rate_limited", "message": "later"}}, {"Retry-After": "3600"}))
    with Client(server.url, "key", max_retry_wait=60) as client, pytest.raises(ApiError) as refused:
        client.get_job("job_1")
    assert refused.value.retry_after == 3600 and len(server.seen) == 1


def test_an_error_without_the_error_shape_still_raises_api_error(scripted) -> None:
    def respond(handler, seen):
        handler.send_response(502)
        handler.send_header("Content-Type", "text/html")
        handler.send_header("Content-Length", "11")
        handler.end_headers()
        handler.wfile.write(b"<h1>bad</h1>"[:11])

    with Client(scripted(respond).url, "key") as client, pytest.raises(ApiError) as failed:
        client.get_job("job_1")
    assert (failed.value.status, failed.value.code) == (502, "http_502")


def test_an_unreachable_service_is_a_connection_error() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", "key") as client, pytest.raises(ApiError) as failed:
        client.list_models()
    assert failed.value.status is None and failed.value.code == "connection_failed"
    assert failed.value.is_connection_error


def test_url_and_key_come_from_the_environment_then_the_home(monkeypatch, tmp_path) -> None:
    (tmp_path / "api_key").write_text("mp_from_home\n")
    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path))
    monkeypatch.delenv("MODELPRESS_API_KEY", raising=False)
    monkeypatch.delenv("MODELPRESS_URL", raising=False)
    with Client() as client:
        assert client.url == "http://127.0.0.1:8000"
        assert client.http.headers["authorization"] == "Bearer mp_from_home"
    monkeypatch.setenv("MODELPRESS_API_KEY", "mp_from_env")
    monkeypatch.setenv("MODELPRESS_URL", "http://example.test:9/")
    with Client() as client:
        assert client.url == "http://example.test:9"
        assert client.http.headers["authorization"] == "Bearer mp_from_env"
    with Client("http://other.test", "mp_given") as client:
        assert client.http.headers["authorization"] == "Bearer mp_given"
        assert isinstance(client.http, httpx.Client)
