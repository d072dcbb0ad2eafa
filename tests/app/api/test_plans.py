"""Dry runs (`POST /v1/jobs` with `"dry_run": true`): the plan, the same refusals as a submission, nothing created.

A real worker serving the queue is covered end to end in tests/e2e/test_openapi_client.py."""

import io
from datetime import timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.api.main import create_app
from app.core import presence
from app.core.db import make_engine, make_session_factory, session_scope, utcnow
from app.core.recipe import Recipe
from app.core.tables import Job, Model, QueueHeartbeat
from app.core.tuning import candidate_recipes

INPUTS = [{"name": "input", "shape": ["batch", 16], "dtype": "float32"}]
VAD_INPUTS = [{"name": "input", "shape": ["N", 512], "dtype": "float32"},
              {"name": "state", "shape": [2, "N", 128], "dtype": "float32"},
              {"name": "sr", "shape": [], "dtype": "int64"}]


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def inspected(settings, model_id: str, inputs: list[dict], **info) -> None:
    """The model as a worker's inspection leaves it: ready, its inputs described."""
    engine = make_engine(settings.resolved_database_url())
    with session_scope(make_session_factory(engine)) as session:
        model = session.get(Model, model_id)
        model.status, model.info = "ready", {"inputs": inputs, **info}
    engine.dispose()


def upload(client, auth, path: str, filename: str, data: bytes) -> str:
    response = client.post(path, headers=auth, files={"file": (filename, data)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def dry_run(client, auth, body: dict, **headers):
    return client.post("/v1/jobs", headers={**auth, **headers}, json={**body, "dry_run": True})


def jobs_in_database(settings) -> int:
    engine = make_engine(settings.resolved_database_url())
    with make_session_factory(engine)() as session:
        count = session.query(Job).count()
    engine.dispose()
    return count


def test_a_preset_dry_run_shows_the_resolved_plan_and_creates_nothing(client, auth, settings, onnx_bytes):
    model_id = upload(client, auth, "/v1/models", "mlp.onnx", onnx_bytes)
    inspected(settings, model_id, INPUTS)
    jobs_before, messages_before = jobs_in_database(settings), sorted(settings.broker_folder().glob("*.msg"))
    body = {"model_id": model_id, "preset": "int8-cpu", "name": "edge"}
    response = dry_run(client, auth, body, **{"Idempotency-Key": "k1"})
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["dry_run"] is True and plan["name"] == "edge" and plan["preset"] == "int8-cpu"
    assert plan["model"] == {"id": model_id, "name": "mlp.onnx", "format": "onnx", "status": "ready"}
    assert plan["recipe"] == {"steps": [{"op": "quantize", "method": "auto", "dtype": "int8",
                                         "granularity": "per_channel", "group_size": None, "exclude": [],
                                         "calibration_method": "minmax", "smoothing": None, "algorithm": "rtn"}]}
    assert plan["target"] == {"runtime": "onnxruntime", "device": "cpu"}
    assert (plan["min_fidelity"], plan["min_fidelity_source"]) == (0.9, "default")
    assert plan["tune"] is None and plan["datasets"] == [] and plan["evaluation"] == "generated inputs"
    assert plan["queue"] == {"name": "cpu", "workers": "none", "last_served_at": None}
    assert [w.split(":")[0] for w in plan["warnings"]] == [
        "no eval dataset", "quantize method 'auto' chooses static int8 for convolutional nets, calibrated here on "
        "generated inputs (no calibration dataset); give a calibration dataset of real inputs",
        "no worker serves the 'cpu' queue now"]
    # Nothing was written or sent, and the Idempotency-Key was not taken: a real job with another body may use it.
    assert jobs_in_database(settings) == jobs_before
    assert sorted(settings.broker_folder().glob("*.msg")) == messages_before
    real = client.post("/v1/jobs", headers={**auth, "Idempotency-Key": "k1"},
                        json={"model_id": model_id, "preset": "int4-weights"})
    assert real.status_code == 201 and "Idempotent-Replayed" not in real.headers


@pytest.mark.parametrize("body, status", [
    ({"model_id": "mdl_nope", "preset": "int8-cpu"}, 404),
    ({"preset": "int8-cpu", "datasets": {"eval": "ds_nope"}}, 404),
    ({"preset": "int8-cpu", "webhook_url": "http://127.0.0.1:9/hook"}, 422),
    ({"preset": "int8-cpu", "input_specs": {"audio": {"shape": [1]}}}, 422),
    ({"recipe": {"steps": [{"op": "prune", "method": "structured", "sparsity": 0.5}]}}, 422),
    ({"preset": "int8-static-cpu"}, 422),
    ({"preset": "no-such-preset"}, 422),
])
def test_a_dry_run_is_refused_as_the_submission_would_be(client, auth, settings, onnx_bytes, body, status):
    model_id = upload(client, auth, "/v1/models", "mlp.onnx", onnx_bytes)
    inspected(settings, model_id, INPUTS)
    body = {"model_id": model_id, **body}
    planned, submitted = dry_run(client, auth, body), client.post("/v1/jobs", headers=auth, json=body)
    assert planned.status_code == submitted.status_code == status, (planned.text, submitted.text)
    assert planned.json() == submitted.json()


def test_at_the_job_limit_a_dry_run_gets_the_same_429(settings, make_key, onnx_bytes):
    with TestClient(create_app(settings.model_copy(update={"tenant_max_active_jobs": 1}),
                               housekeeping=False)) as client:
        auth = make_key()
        model_id = upload(client, auth, "/v1/models", "mlp.onnx", onnx_bytes)
        body = {"model_id": model_id, "preset": "int8-cpu"}
        assert dry_run(client, auth, body).status_code == 200  # a plan takes no slot
        assert client.post("/v1/jobs", headers=auth, json=body).status_code == 201
        planned, submitted = dry_run(client, auth, body), client.post("/v1/jobs", headers=auth, json=body)
        assert planned.status_code == submitted.status_code == 429
        assert planned.json() == submitted.json() and planned.json()["error"]["code"] == "too_many_jobs"


def test_datasets_are_matched_to_the_model_inputs_and_specs(client, auth, settings, onnx_bytes):
    rng = np.random.default_rng(0)
    model_id = upload(client, auth, "/v1/models", "vad.onnx", onnx_bytes)
    inspected(settings, model_id, VAD_INPUTS)
    specs = {"state": {"batch_axis": 1}, "sr": {"value": 16000}}
    fits = upload(client, auth, "/v1/datasets", "eval.npz", npz(
        input=rng.standard_normal((8, 512)).astype(np.float32), state=np.zeros((8, 2, 128), np.float32),
        labels=np.arange(8) % 2))
    wrong = upload(client, auth, "/v1/datasets", "calibration.npz", npz(
        input=rng.standard_normal((8, 256)).astype(np.float32), state=np.zeros((8, 2, 128), np.float32)))
    plan = dry_run(client, auth, {"model_id": model_id, "input_specs": specs, "preset": "int8-static-cpu",
                                   "datasets": {"eval": fits, "calibration": wrong}}).json()
    by_role = {d["role"]: d for d in plan["datasets"]}
    assert by_role["eval"] == {
        "role": "eval", "id": fits, "name": "eval.npz", "format": "npz", "num_samples": 8, "has_labels": True,
        "used_for": ["fidelity", "accuracy"], "fits": True, "problem": None,
        "feeds": {"input": "array 'input'", "state": "array 'state'", "sr": "a constant of the input specs"}}
    assert by_role["calibration"]["fits"] is False and by_role["calibration"]["used_for"] == ["calibration"]
    problem = ("calibration dataset: array 'input' has shape (8, 256) per-sample (256,), but model input 'input' "
               "expects (512,)")
    assert by_role["calibration"]["problem"] == problem
    assert f"datasets.calibration: {problem}; the job would fail" in plan["warnings"]
    assert plan["evaluation"] == "eval dataset" and plan["input_specs"] == specs
    assert not any(w.startswith("no eval dataset") for w in plan["warnings"])


def test_before_inspection_and_for_text_datasets_the_fit_is_said_plainly(client, auth, onnx_bytes, settings):
    model_id = upload(client, auth, "/v1/models", "mlp.onnx", onnx_bytes)
    texts = upload(client, auth, "/v1/datasets", "texts.jsonl", b'{"text": "hello"}\n{"text": "world"}\n')
    body = {"model_id": model_id, "preset": "int8-cpu", "datasets": {"calibration": texts}}
    plan = dry_run(client, auth, body).json()
    assert plan["model"]["status"] == "uploaded" and plan["datasets"][0]["fits"] is None
    assert plan["warnings"][0].startswith("the model is still being inspected")
    assert plan["evaluation"] == "calibration dataset"
    inspected(settings, model_id, INPUTS)
    calibration = dry_run(client, auth, body).json()["datasets"][0]
    assert calibration["fits"] is False
    assert calibration["problem"] == ("calibration dataset: a .jsonl text dataset needs a Hugging Face model that "
                                      "ships its tokenizer")


def test_a_tune_dry_run_lists_the_candidates_it_would_try(client, auth, settings, onnx_bytes):
    model_id = upload(client, auth, "/v1/models", "mlp.onnx", onnx_bytes)
    inspected(settings, model_id, INPUTS, params=100)
    calibration = upload(client, auth, "/v1/datasets", "c.npz", npz(x=np.zeros((4, 16), np.float32)))
    plan = dry_run(client, auth, {"model_id": model_id, "tune": {"max_trials": 3},
                                   "datasets": {"calibration": calibration}}).json()
    tune = plan["tune"]
    assert tune["generated"] is True and tune["max_trials"] == 3 and tune["metric"] == "fidelity"
    assert tune["candidates"] == candidate_recipes(None, has_calibration=True, model_kind="onnx", layer_names=[])
    assert plan["recipe"] is None and plan["datasets"][0]["feeds"] == {"input": "array 'x'"}
    user = {"steps": [{"op": "quantize", "method": "dynamic"}]}
    given = dry_run(client, auth, {"model_id": model_id, "tune": {"search": [user, user]}}).json()["tune"]
    assert given["generated"] is False  # as given, defaults filled in, repeats dropped
    assert given["candidates"] == [Recipe.model_validate(user).model_dump(mode="json")]


def test_the_queue_is_served_as_the_workers_heartbeats_say(client, auth, settings, onnx_bytes):
    """The service's own judgement (app.core.presence): a cpu worker that beat just now serves `cpu`, none serves
    `gpu`, and one whose last beat is older than the heartbeat timeout serves nothing any more."""
    model_id = upload(client, auth, "/v1/models", "mlp.onnx", onnx_bytes)
    engine = make_engine(settings.resolved_database_url())
    with session_scope(make_session_factory(engine)) as session:
        presence.record(session, "cpu-4242@host", ["cpu"])
    plan = dry_run(client, auth, {"model_id": model_id, "preset": "int8-cpu"}).json()
    assert plan["queue"]["name"] == "cpu" and plan["queue"]["workers"] == "available"
    assert plan["queue"]["last_served_at"] is not None
    assert not any("queue" in warning for warning in plan["warnings"])
    cuda = dry_run(client, auth, {"model_id": model_id, "preset": "int8-cpu", "target": {"device": "cuda"}}).json()
    assert cuda["queue"]["name"] == "gpu" and cuda["queue"]["workers"] == "none"
    assert cuda["warnings"][-1] == ("no worker serves the 'gpu' queue now: the job would wait queued until one "
                                    "starts (`modelpress worker --queues gpu`, on a machine with CUDA), and fail "
                                    f"with no_worker after {settings.queue_timeout:g} s")
    stale = utcnow() - timedelta(seconds=settings.heartbeat_timeout + 1)
    with session_scope(make_session_factory(engine)) as session:
        session.execute(update(QueueHeartbeat).where(QueueHeartbeat.queue == "cpu").values(seen_at=stale))
    engine.dispose()
    assert dry_run(client, auth, {"model_id": model_id, "preset": "int8-cpu"}).json()["queue"]["workers"] == "none"


def test_an_encoder_distilled_on_unlabelled_text_gets_the_encoder_defaults_it_left_out(client, auth, tmp_path):
    """Resolved at submission, so the plan and the job show what will run; labelled text keeps the step's own."""
    from tests.helpers import pack, save_tiny_bert

    save_tiny_bert(tmp_path / "bert", num_labels=None)
    model_id = upload(client, auth, "/v1/models", "bert.zip", pack(tmp_path / "bert", tmp_path / "b.zip").read_bytes())
    texts = upload(client, auth, "/v1/datasets", "texts.jsonl", b'{"text": "hello"}\n{"text": "world"}\n')
    labelled = upload(client, auth, "/v1/datasets", "labelled.jsonl",
                      b'{"text": "hello", "label": 0}\n{"text": "world", "label": 1}\n')
    step = {"op": "distill", "student": {"current": True}, "epochs": 2}

    def distill_step(train: str, **body) -> dict:
        response = client.post("/v1/jobs", headers=auth, json={
            "model_id": model_id, "recipe": {"steps": [step]}, "datasets": {"train": train}, **body})
        assert response.status_code in (200, 201), response.text
        return response.json()["recipe"]["steps"][0]

    for resolved in (distill_step(texts, dry_run=True), distill_step(texts)):
        keys = ("alpha", "lr", "epochs", "early_stopping", "layer_weight", "dropout", "lr_schedule")
        assert {k: resolved[k] for k in keys} == {
            "alpha": 1.0, "lr": 3e-4, "epochs": 2, "early_stopping": 2, "layer_weight": 1.0,
            "dropout": False, "lr_schedule": "linear"}  # epochs: the step's
    kept = distill_step(labelled, dry_run=True)
    assert (kept["alpha"], kept["lr"], kept["layer_weight"], kept["early_stopping"], kept["dropout"],
            kept["lr_schedule"]) == (0.5, 1e-3, None, None, None, "constant")
