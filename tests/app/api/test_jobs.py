import pytest

RECIPE = {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]}


@pytest.fixture
def model_id(upload):
    return upload().json()["id"]


def submit(client, auth, model_id, recipe=RECIPE, **extra):
    return client.post("/v1/jobs", headers={**auth, **extra.pop("headers", {})},
                       json={"model_id": model_id, "recipe": recipe, **extra})


def test_submit_job_is_queued_and_sent(client, auth, model_id, settings, no_workers):
    from app.core import presence
    from app.core.db import session_scope

    with session_scope(no_workers) as session:
        presence.record(session, "cpu-1@host", ["cpu"])  # a worker serves cpu: nothing to say in the message
    response = submit(client, auth, model_id, name="int8 please")
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert job["name"] == "int8 please"
    assert job["target"] == {"runtime": "onnxruntime", "device": "cpu"}
    assert job["progress"] == {"fraction": 0.0, "step": None, "message": None}
    assert job["attempts"] == 0 and job["error"] is None and job["artifacts"] == []
    assert job["recipe"]["steps"][0]["granularity"] == "per_channel"
    # The message really went to the broker (the database row was committed first).
    from app.core.db import make_engine, make_session_factory
    from app.core.tables import Job

    with make_session_factory(make_engine(settings.resolved_database_url()))() as session:
        assert session.get(Job, job["id"]).dispatched_at is not None


@pytest.mark.parametrize("recipe, field", [
    ({"steps": [{"op": "shrink"}]}, "recipe.steps.0"),
    ({"steps": [{"op": "quantize", "dtype": "int3"}]}, "recipe.steps.0.quantize.dtype"),
    ({"steps": [{"op": "quantize", "colour": "red"}]}, "recipe.steps.0.quantize.colour"),
    ({"steps": []}, "recipe.steps"),
    ({"steps": [{"op": "quantize", "method": "static", "dtype": "int4"}]}, "recipe.steps.0.quantize"),
    ({"steps": [{"op": "quantize", "method": "static"}]}, "datasets.calibration"),
    ({"steps": [{"op": "prune", "method": "magnitude"}]}, "recipe.steps.0.prune"),
    ({"steps": [{"op": "prune", "sparsity": 1.5}]}, "recipe.steps.0.prune.sparsity"),
    ({"steps": [{"op": "prune", "pattern": "2:4", "sparsity": 0.7}]}, "recipe.steps.0.prune"),
    ({"steps": [{"op": "prune", "method": "activation_aware", "sparsity": 0.5}]}, "datasets.calibration"),
    ({"steps": [{"op": "prune", "method": "sparsegpt", "sparsity": 0.5}]}, "datasets.calibration"),
    ({"steps": [{"op": "prune", "method": "sparsegpt", "threshold": 0.1}]}, "recipe.steps.0.prune"),
    ({"steps": [{"op": "quantize"}, {"op": "prune", "sparsity": 0.5}]}, "recipe: steps.1"),
    ({"steps": [{"op": "quantize", "dtype": "bf16"}]}, "recipe.steps.0.dtype"),
    ({"steps": [{"op": "export", "formats": ["tflite"]}]}, "recipe.steps.0.export.formats.0"),
    ({"steps": [{"op": "quantize", "smoothing": "auto"}]}, "datasets.calibration"),
    ({"steps": [{"op": "quantize", "smoothing": 1.5}]}, "recipe.steps.0.quantize.smoothing"),
    ({"steps": [{"op": "quantize", "method": "weight_only", "smoothing": 0.5}]}, "recipe.steps.0.quantize"),
    ({"steps": [{"op": "quantize", "method": "weight_only", "dtype": "int4", "algorithm": "gptq"}]},
     "datasets.calibration"),
    ({"steps": [{"op": "quantize", "method": "dynamic", "algorithm": "hqq"}]}, "recipe.steps.0.quantize"),
])
def test_bad_recipe_is_422_naming_the_field(client, auth, model_id, recipe, field):
    response = submit(client, auth, model_id, recipe)
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith(field), response.json()


def test_bad_target_and_unknown_top_level_field_are_422(client, auth, model_id):
    response = submit(client, auth, model_id, target={"runtime": "onnxruntime", "device": "tpu"})
    assert response.status_code == 422 and "target.device" in response.json()["error"]["message"]
    response = submit(client, auth, model_id, priority=3)
    assert response.status_code == 422 and "priority" in response.json()["error"]["message"]


def test_unknown_model_is_404_naming_model_id(client, auth):
    response = submit(client, auth, "mdl_nope")
    assert response.status_code == 404
    assert "model_id" in response.json()["error"]["message"]


def test_cuda_jobs_go_to_the_gpu_queue(client, auth, model_id, settings):
    job = submit(client, auth, model_id, target={"device": "cuda"}).json()
    from app.core.db import make_engine, make_session_factory
    from app.core.tables import Job

    with make_session_factory(make_engine(settings.resolved_database_url()))() as session:
        assert session.get(Job, job["id"]).queue == "gpu"


def test_get_job_etag_and_304(client, auth, model_id):
    job = submit(client, auth, model_id).json()
    first = client.get(f"/v1/jobs/{job['id']}", headers=auth)
    assert first.status_code == 200 and first.json()["id"] == job["id"]
    etag = first.headers["etag"]
    again = client.get(f"/v1/jobs/{job['id']}", headers={**auth, "If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    changed = client.get(f"/v1/jobs/{job['id']}", headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag


def test_get_job_if_none_match_star_is_304(client, auth, model_id):
    """`*` matches any current representation (RFC 9110 13.1.2)."""
    job = submit(client, auth, model_id).json()
    response = client.get(f"/v1/jobs/{job['id']}", headers={**auth, "If-None-Match": "*"})
    assert response.status_code == 304 and response.content == b"" and response.headers["etag"]
    assert client.get(f"/v1/jobs/{job['id']}", headers={**auth, "If-None-Match": '"other", *'}).status_code == 304


@pytest.mark.parametrize("body, what", [
    (b'{"model_id": 12,', "Expecting property name enclosed in double quotes at line 1, column 17"),
    (b'{"model_id": "m"\n "recipe": {}}', "Expecting ',' delimiter at line 2, column 2"),
    (b"{'model_id': 'm'}", "Expecting property name enclosed in double quotes at line 1, column 2"),
    (b'{"name": "\xff"}', "not UTF-8"),
    (b"[" * 100_000, "nested too deeply"),
])
def test_malformed_json_is_400_saying_what_and_where(client, auth, body, what):
    response = client.post("/v1/jobs", headers={**auth, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_request"
    assert response.json()["error"]["message"].startswith(f"malformed JSON body: {what}")


@pytest.mark.parametrize("extra, field", [
    ({"recipe": {"steps": [{"op": "quantize", "exclude": ["x" * 513]}]}}, "recipe.steps.0.quantize.exclude.0"),
    ({"recipe": {"steps": [{"op": "prune", "sparsity": 0.5, "exclude": ["x"] * 101}]}},
     "recipe.steps.0.prune.exclude"),
    ({"recipe": {"steps": [{"op": "analyze"}] * 33}}, "recipe.steps"),
    ({"tune": {"search": [{"steps": [{"op": "quantize"}]}] * 101}}, "tune.search"),
    ({"name": "n" * 201}, "name"),
    ({"datasets": {"eval": "d" * 41}}, "datasets.eval"),
    ({"preset": "p" * 65, "recipe": None}, "preset"),
])
def test_strings_and_lists_in_a_job_are_bounded(client, auth, model_id, extra, field):
    response = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "recipe": RECIPE, **extra})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith(f"{field}: ")


def test_cancel_queued_job_then_409(client, auth, model_id):
    job = submit(client, auth, model_id).json()
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_finished"


def test_idempotency_key_returns_the_first_job(client, auth, model_id):
    headers = {"Idempotency-Key": "abc-123"}
    first = submit(client, auth, model_id, headers=headers)
    second = submit(client, auth, model_id, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"]
    assert second.headers.get("idempotent-replayed") == "true"
    other_body = submit(client, auth, model_id, name="different", headers=headers)
    assert other_body.status_code == 409
    assert len(client.get("/v1/jobs", headers=auth).json()["data"]) == 1
    assert submit(client, auth, model_id, headers={"Idempotency-Key": "other"}).json()["id"] != first.json()["id"]


def test_list_filters_and_pagination(client, auth, upload, model_id):
    other_model = upload().json()["id"]
    ids = [submit(client, auth, model_id).json()["id"] for _ in range(3)]
    other = submit(client, auth, other_model).json()["id"]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth)
    by_model = client.get("/v1/jobs", headers=auth, params={"model_id": model_id}).json()["data"]
    assert {j["id"] for j in by_model} == set(ids)
    cancelled = client.get("/v1/jobs", headers=auth, params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert client.get("/v1/jobs", headers=auth, params={"status": "bogus"}).status_code == 422
    page1 = client.get("/v1/jobs", headers=auth, params={"limit": 3}).json()
    page2 = client.get("/v1/jobs", headers=auth, params={"limit": 3, "cursor": page1["next_cursor"]}).json()
    assert [j["id"] for j in page1["data"] + page2["data"]] == [other, *reversed(ids)]
    assert page2["next_cursor"] is None


def test_report_is_404_until_it_exists(client, auth, model_id):
    job = submit(client, auth, model_id).json()
    assert client.get(f"/v1/jobs/{job['id']}/report", headers=auth).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json() == {"data": []}


def test_model_with_unfinished_job_cannot_be_deleted(client, auth, model_id):
    job = submit(client, auth, model_id).json()
    assert client.delete(f"/v1/models/{model_id}", headers=auth).status_code == 409
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert client.delete(f"/v1/models/{model_id}", headers=auth).status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["model_id"] == model_id


@pytest.mark.parametrize("recipe, target, field", [
    ({"steps": [{"op": "quantize"}]}, {"runtime": "pytorch"}, "target.runtime"),
    ({"steps": [{"op": "prune", "method": "structured", "sparsity": 0.5}]}, {}, "recipe.steps.0.method"),
    ({"steps": [{"op": "export", "formats": ["pt2"]}]}, {}, "recipe.steps.0.formats"),
    ({"steps": [{"op": "export", "formats": ["onnx", "hf"]}]}, {}, "recipe.steps.0.formats"),
])
def test_recipes_an_onnx_model_cannot_take_are_422(client, auth, model_id, recipe, target, field):
    response = submit(client, auth, model_id, recipe, target=target)
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith(field), response.json()


def test_pt2_model_takes_pytorch_target_and_torch_methods(client, auth, upload, pt2_bytes):
    model_id = upload(pt2_bytes, filename="m.pt2").json()["id"]
    response = submit(client, auth, model_id, {"steps": [{"op": "prune", "method": "structured", "sparsity": 0.5},
                                                         {"op": "quantize", "method": "weight_only", "dtype": "int4"},
                                                         {"op": "export", "formats": ["pt2", "safetensors"]}]},
                      target={"runtime": "pytorch"})
    assert response.status_code == 201, response.text
    gptq = submit(client, auth, model_id, {"steps": [{"op": "quantize", "method": "weight_only", "dtype": "int4",
                                                       "algorithm": "hqq"}]}, target={"runtime": "pytorch"})
    assert gptq.status_code == 422 and gptq.json()["error"]["message"].startswith("recipe.steps.0.algorithm")


def test_presets_are_listed_and_usable(client, auth, model_id):
    presets = {p["name"]: p for p in client.get("/v1/presets", headers=auth).json()["data"]}
    assert {"int8-cpu", "sparse50-int8", "distill-half-int8"} <= set(presets)
    assert presets["sparse50-int8"]["needs"] == ["calibration"]
    job = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "preset": "int8-cpu"})
    assert job.status_code == 201, job.text
    assert job.json()["recipe"]["steps"][0]["op"] == "quantize"
    unknown = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "preset": "shrink-ray"})
    assert unknown.status_code == 422 and "int8-cpu" in unknown.json()["error"]["message"]
    both = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "preset": "int8-cpu",
                                                        "recipe": RECIPE})
    assert both.status_code == 422
    assert presets["fast-encoder"]["needs"] == ["train"]
    untrained = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "preset": "fast-encoder"})
    assert untrained.status_code == 422 and untrained.json()["error"]["message"].startswith("datasets.train")


def test_tune_job_is_accepted_and_validated(client, auth, model_id):
    body = {"model_id": model_id, "tune": {"metric": "fidelity", "max_loss": 0.01, "objective": "size",
                                           "max_trials": 3, "search": [RECIPE]}}
    response = client.post("/v1/jobs", headers=auth, json=body)
    assert response.status_code == 201, response.text
    assert response.json()["tune"]["max_trials"] == 3 and response.json()["recipe"] is None
    accuracy = client.post("/v1/jobs", headers=auth, json={**body, "tune": {"metric": "accuracy"}})
    assert accuracy.status_code == 422 and accuracy.json()["error"]["message"].startswith("datasets.eval")
    nothing = client.post("/v1/jobs", headers=auth, json={"model_id": model_id})
    assert nothing.status_code == 422
    bad_search = client.post("/v1/jobs", headers=auth, json={**body, "tune": {"search": [{"steps": [
        {"op": "prune", "method": "structured", "sparsity": 0.5}]}]}})
    assert bad_search.status_code == 422  # an ONNX model cannot take structured pruning


@pytest.mark.parametrize("step, field", [
    ({"op": "distill", "student": {"shrink": {"depth": 0.5}}}, "datasets.train"),
    ({"op": "finetune"}, "datasets.train"),
    ({"op": "distill", "student": {}}, "recipe.steps.0.distill.student"),
    ({"op": "distill", "student": {"shrink": {"depth": 1.0}}}, "recipe.steps.0.distill.student"),
    ({"op": "distill", "student": {"current": True, "shrink": {"depth": 0.5}}}, "recipe.steps.0.distill.student"),
    ({"op": "distill", "student": {"current": False}}, "recipe.steps.0.distill.student"),
    ({"op": "distill", "student": {"shrink": {"depth": 0.5}}, "temperature": 0}, "recipe.steps.0.distill.temperature"),
    ({"op": "distill", "student": {"shrink": {"depth": 0.5}}, "alpha": 1.5}, "recipe.steps.0.distill.alpha"),
    ({"op": "analyze", "bins": 1}, "recipe.steps.0.analyze.bins"),
])
def test_training_steps_are_validated(client, auth, model_id, step, field):
    response = submit(client, auth, model_id, {"steps": [step]})
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith(field), response.json()


def test_student_model_must_be_the_tenants(client, make_key, upload, pt2_bytes, tmp_path):
    import numpy as np

    alice, bob = make_key(), make_key()
    teacher = upload(pt2_bytes, filename="t.pt2", headers=alice).json()["id"]
    bobs_model = upload(pt2_bytes, filename="s.pt2", headers=bob).json()["id"]
    np.savez(tmp_path / "train.npz", x=np.zeros((8, 16), np.float32), labels=np.zeros(8, np.int64))
    with open(tmp_path / "train.npz", "rb") as fh:
        train = client.post("/v1/datasets", headers=alice, files={"file": ("train.npz", fh)}).json()["id"]
    body = {"model_id": teacher, "datasets": {"train": train},
            "recipe": {"steps": [{"op": "distill", "student": {"model_id": bobs_model}}]}}
    response = client.post("/v1/jobs", headers=alice, json=body)
    assert response.status_code == 404
    assert response.json()["error"]["message"].startswith("recipe.steps.0.student.model_id")


def test_framework_json_errors_are_400_too():
    """The body guard answers malformed JSON first; should FastAPI ever meet some, it is told the same way."""
    from fastapi.exceptions import RequestValidationError

    from app.api.errors import _malformed_json

    error = RequestValidationError([{"type": "json_invalid", "loc": ("body", 9), "msg": "JSON decode error",
                                     "input": {}, "ctx": {"error": "Expecting value"}}], body='{"a": 1,\n }')
    assert _malformed_json(error) == "malformed JSON body: Expecting value at line 2, column 1"


def test_the_fidelity_floor_is_taken_kept_and_checked(client, auth, model_id):
    job = submit(client, auth, model_id, min_fidelity=0.95, accept_degraded=True).json()
    assert (job["min_fidelity"], job["accept_degraded"]) == (0.95, True)
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["min_fidelity"] == 0.95
    plain = submit(client, auth, model_id).json()
    assert (plain["min_fidelity"], plain["accept_degraded"]) == (None, False)
    for bad in (1.5, -0.1, "high"):
        response = submit(client, auth, model_id, min_fidelity=bad)
        assert response.status_code == 422 and response.json()["error"]["message"].startswith("min_fidelity")
    presets = {p["name"]: p for p in client.get("/v1/presets", headers=auth).json()["data"]}
    assert presets["sparse50-int8"]["min_fidelity"] == 0.8 and presets["int8-cpu"]["min_fidelity"] is None


def test_a_preset_brings_its_floor_unless_the_job_sets_one():
    from app.api.schemas import JobCreate

    body = {"model_id": "mdl_x", "preset": "sparse50-int8", "datasets": {"calibration": "ds_x"}}
    assert JobCreate.model_validate(body).min_fidelity == 0.8
    assert JobCreate.model_validate({**body, "min_fidelity": 0.95}).min_fidelity == 0.95
    assert JobCreate.model_validate({"model_id": "mdl_x", "preset": "int8-cpu"}).min_fidelity is None


SPECS = {"input": {"shape": [1, 512]}, "state": {"shape": [2, 1, 128], "batch_axis": 1}, "sr": {"value": 16000}}
VAD_INPUTS = [{"name": "input", "shape": ["N", "samples"], "dtype": "float32"},
              {"name": "state", "shape": [2, "N", 128], "dtype": "float32"},
              {"name": "sr", "shape": [], "dtype": "int64"}]


def inspected(settings, model_id, inputs):
    """The model as a worker's inspection leaves it: ready, its inputs described."""
    from app.core.db import make_engine, make_session_factory
    from app.core.tables import Model

    engine = make_engine(settings.resolved_database_url())
    with make_session_factory(engine)() as session:
        model = session.get(Model, model_id)
        model.status, model.info = "ready", {"inputs": inputs}
        session.commit()
    engine.dispose()


def test_input_specs_are_kept_and_shown(client, auth, model_id):
    job = submit(client, auth, model_id, input_specs=SPECS)
    assert job.status_code == 201, job.text
    assert job.json()["input_specs"] == SPECS
    assert client.get(f"/v1/jobs/{job.json()['id']}", headers=auth).json()["input_specs"] == SPECS
    assert submit(client, auth, model_id).json()["input_specs"] is None


@pytest.mark.parametrize("specs, field", [
    ({"sr": {"value": 16000, "range": [0, 1]}}, "input_specs.sr: value: a constant excludes range"),
    ({"state": {"shape": [2, 1], "batch_axis": 2}}, "input_specs.state: batch_axis"),
    ({"input": {"range": [1, 0]}}, "input_specs.input: range"),
    ({"input": {"dtype": "complex64"}}, "input_specs.input.dtype"),
    ({"input": {"shape": [1, -512]}}, "input_specs.input.shape.1"),
    ({"input": []}, "input_specs.input"),
    ([1], "input_specs"),
])
def test_bad_input_specs_are_422_naming_the_field(client, auth, model_id, specs, field):
    response = submit(client, auth, model_id, input_specs=specs)
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith(field), response.json()


def test_specs_naming_no_input_of_an_inspected_model_are_422_listing_its_inputs(client, auth, model_id, settings):
    inspected(settings, model_id, VAD_INPUTS)
    response = submit(client, auth, model_id, input_specs={**SPECS, "audio": {"shape": [1, 512]}})
    assert response.status_code == 422
    assert response.json()["error"]["message"] == ("input_specs.audio: the model has no input 'audio'; its "
                                                   "inputs are input, state, sr")
    wrong_dim = submit(client, auth, model_id, input_specs={"state": {"shape": [3, 1, 128]}})
    assert wrong_dim.status_code == 422
    assert wrong_dim.json()["error"]["message"].startswith("input_specs.state.shape: dim 0 is 3")
    assert submit(client, auth, model_id, input_specs=SPECS).status_code == 201


def test_a_job_takes_the_model_specs_as_defaults_and_overrides_them_per_input(client, auth, upload, settings):
    import json

    model = upload(input_specs=json.dumps(SPECS)).json()
    assert model["input_specs"] == SPECS
    job = submit(client, auth, model["id"], input_specs={"sr": {"value": 8000}}).json()
    assert job["input_specs"] == {**SPECS, "sr": {"value": 8000}}
    assert submit(client, auth, model["id"]).json()["input_specs"] == SPECS


def test_another_tenants_model_is_404_before_its_inputs_are_checked(client, make_key, upload, settings):
    alice_model = upload().json()["id"]
    inspected(settings, alice_model, VAD_INPUTS)
    response = submit(client, make_key(), alice_model, input_specs={"audio": {"shape": [1]}})
    assert response.status_code == 404 and "state" not in response.text


@pytest.fixture
def model_with_info(upload, pt2_bytes, settings):
    """A .pt2 upload whose stored inspection says `info` (what a worker would have written)."""
    from sqlalchemy import update

    from app.core.db import make_engine, make_session_factory, session_scope
    from app.core.tables import Model

    def _make(info: dict) -> str:
        model_id = upload(pt2_bytes, "model.pt2").json()["id"]
        engine = make_engine(settings.resolved_database_url())
        with session_scope(make_session_factory(engine)) as session:
            session.execute(update(Model).where(Model.id == model_id).values(info=info))
        engine.dispose()
        return model_id

    return _make


def test_model_too_large_for_onnx_is_422_unless_the_target_is_pytorch(client, auth, model_with_info):
    model_id = model_with_info({"params": 600_000_000, "inputs": [], "outputs": []})  # 2.2 GiB as fp32
    response = submit(client, auth, model_id)
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert message.startswith("target.runtime") and "too large for a single ONNX file" in message
    export = {"steps": [{"op": "quantize"}, {"op": "export", "formats": ["onnx"]}]}
    assert submit(client, auth, model_id, export, target={"runtime": "pytorch"}).status_code == 422
    assert submit(client, auth, model_id, target={"runtime": "pytorch"}).status_code == 201
    assert submit(client, auth, model_with_info({"params": 500_000_000})).status_code == 201  # 1.9 GiB


def test_encoder_decoder_steps_that_do_not_apply_are_422(client, auth, model_with_info):
    model_id = model_with_info({"params": 1000, "architecture": {"model_type": "t5", "task": "seq2seq-lm"}})
    assert submit(client, auth, model_id).status_code == 201
    for recipe, target, field in [
        (RECIPE, {"runtime": "pytorch"}, "target.runtime"),
        ({"steps": [{"op": "prune", "method": "structured", "sparsity": 0.5}]}, None, "recipe.steps.0.method"),
        ({"steps": [{"op": "export", "formats": ["pt2"]}]}, None, "recipe.steps.0.formats"),
        ({"steps": [{"op": "quantize", "method": "weight_only", "dtype": "int4", "algorithm": "hqq"}]}, None,
         "recipe.steps.0: calibrated or searched"),
    ]:
        response = submit(client, auth, model_id, recipe, **({"target": target} if target else {}))
        assert response.status_code == 422 and response.json()["error"]["message"].startswith(field), response.text
        assert "encoder-decoder" in response.json()["error"]["message"]


def test_tune_on_perplexity_needs_an_eval_dataset(client, auth, model_id):
    response = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "tune": {"metric": "perplexity"}})
    assert response.status_code == 422 and response.json()["error"]["message"].startswith("datasets.eval")


def test_delete_removes_a_finished_jobs_outputs_and_keeps_the_job(client, auth, make_key, model_id, finish_job,
                                                                  settings):
    from app.core import jobs
    from app.core.db import make_engine, make_session_factory, session_scope
    from app.core.storage import open_storage

    job_id = submit(client, auth, model_id).json()["id"]
    queued = client.delete(f"/v1/jobs/{job_id}", headers=auth)
    assert queued.status_code == 409, queued.text
    assert queued.json()["error"]["code"] == "job_active"
    assert "cancel it first" in queued.json()["error"]["message"]
    running_id = submit(client, auth, model_id).json()["id"]
    with session_scope(make_session_factory(make_engine(settings.resolved_database_url()))) as session:
        jobs.claim(session, running_id, "w1", jobs.stale_cutoff(60))
    assert client.delete(f"/v1/jobs/{running_id}", headers=auth).json()["error"]["code"] == "job_active"

    keys = finish_job(job_id)
    storage = open_storage(settings.resolved_storage_url())
    artifacts = client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json()["data"]
    assert len(artifacts) == 2
    assert client.get(f"/v1/artifacts/{artifacts[0]['id']}/download", headers=auth).status_code == 200

    assert client.delete(f"/v1/jobs/{job_id}", headers=make_key()).status_code == 404  # another tenant's
    assert all(storage.exists(key) for key in keys)
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["deleted_at"] is None

    response = client.delete(f"/v1/jobs/{job_id}", headers=auth)
    assert response.status_code == 204, response.text
    assert not any(storage.exists(key) for key in keys)
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert (job["status"], job["artifacts"], job["metrics"]) == ("succeeded", [], {"done": True})
    assert job["deleted_at"] is not None
    assert client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json()["data"] == []
    assert client.get(f"/v1/jobs/{job_id}/report", headers=auth).json() == {"done": True}
    download = client.get(f"/v1/artifacts/{artifacts[0]['id']}/download", headers=auth)
    assert download.status_code == 404
    assert "was deleted" in download.json()["error"]["message"]

    assert client.delete(f"/v1/jobs/{job_id}", headers=auth).status_code == 204  # again: nothing changes
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["deleted_at"] == job["deleted_at"]
    assert client.delete("/v1/jobs/job_nope", headers=auth).status_code == 404


def test_a_job_waiting_on_a_queue_no_worker_serves_says_so(client, auth, model_id, no_workers):
    from app.core import presence
    from app.core.db import session_scope

    gpu = submit(client, auth, model_id, target={"device": "cuda"}).json()
    assert gpu["progress"]["message"] == "waiting: no worker serves queue 'gpu'"
    with session_scope(no_workers) as session:
        presence.record(session, "cpu-1@host", ["cpu"])
    cpu = submit(client, auth, model_id).json()
    assert cpu["progress"]["message"] is None
