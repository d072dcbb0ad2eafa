"""Recipes: out-of-range values, unknown ops and fields, malformed bodies. Every one is a 422 at submission whose
message names the offending field, so no worker ever sees it."""

import pytest

PRUNE = {"op": "prune", "method": "magnitude", "sparsity": 0.5}
QUANTIZE = {"op": "quantize", "method": "weight_only", "dtype": "int4"}
DISTILL = {"op": "distill", "student": {"shrink": {"width": 0.5}}}
FINETUNE = {"op": "finetune"}
TRAIN = {"train": "ds_unused"}  # never looked up: the recipe is refused first


@pytest.fixture
def submit(client, auth, upload, pt2_bytes: bytes):
    model_id = upload(pt2_bytes, filename="mlp.pt2").json()["id"]

    def _submit(body: dict):
        return client.post("/v1/jobs", headers=auth, json={"model_id": model_id, **body})

    return _submit


@pytest.mark.parametrize(("body", "field"), [
    ({"recipe": {"steps": [{**PRUNE, "sparsity": 1.5}]}}, "recipe.steps.0.prune.sparsity"),
    ({"recipe": {"steps": [{**PRUNE, "sparsity": -0.1}]}}, "recipe.steps.0.prune.sparsity"),
    ({"recipe": {"steps": [{**DISTILL, "temperature": 0}]}, "datasets": TRAIN}, "recipe.steps.0.distill.temperature"),
    ({"recipe": {"steps": [{**QUANTIZE, "group_size": 7}]}}, "recipe.steps.0.quantize.group_size"),
    ({"recipe": {"steps": [{**QUANTIZE, "group_size": 96}]}}, "group_size must be a power of two"),
    ({"recipe": {"steps": [{**FINETUNE, "epochs": 0}]}, "datasets": TRAIN}, "recipe.steps.0.finetune.epochs"),
    ({"recipe": {"steps": [{**FINETUNE, "lr": -0.001}]}, "datasets": TRAIN}, "recipe.steps.0.finetune.lr"),
    ({"recipe": {"steps": [{**FINETUNE, "batch_size": 0}]}, "datasets": TRAIN}, "recipe.steps.0.finetune.batch_size"),
    ({"recipe": {"steps": [{**DISTILL, "alpha": 1.5}]}, "datasets": TRAIN}, "recipe.steps.0.distill.alpha"),
    ({"recipe": {"steps": [{"op": "explode"}]}}, "recipe.steps.0"),
    ({"recipe": {"steps": [{"method": "dynamic"}]}}, "recipe.steps.0"),
    ({"recipe": {"steps": [{**PRUNE, "colour": "blue"}]}}, "recipe.steps.0.prune.colour"),
    ({"recipe": {"steps": []}}, "recipe.steps"),
    ({"recipe": {"steps": [PRUNE] * 33}}, "recipe.steps"),
    ({"recipe": {"steps": "quantize"}}, "recipe.steps"),
    ({"recipe": {"steps": [PRUNE]}, "target": {"device": "tpu"}}, "target.device"),
    ({"recipe": {"steps": [{"op": "quantize"}, PRUNE]}}, "steps.1: a 'prune' step cannot follow a quantize step"),
    ({"recipe": {"steps": [{**FINETUNE}]}}, "datasets.train"),
    ({"tune": {"max_loss": 2}}, "tune.max_loss"),
    ({"tune": {"max_trials": 0}}, "tune.max_trials"),
    ({"preset": "no-such-preset"}, "preset"),
    ({}, "recipe"),
], ids=["sparsity_1.5", "negative_sparsity", "temperature_0", "group_size_7", "group_size_96", "epochs_0",
        "negative_lr", "batch_size_0", "alpha_1.5", "unknown_op", "missing_op", "unknown_field", "no_steps",
        "too_many_steps", "steps_not_a_list", "unknown_device", "step_after_quantize", "training_without_data",
        "max_loss_2", "max_trials_0", "unknown_preset", "nothing_to_do"])
def test_bad_recipe_is_422_naming_the_field(submit, client, auth, body: dict, field: str) -> None:
    response = submit(body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert field in error["message"], error["message"]
    assert client.get("/v1/jobs", headers=auth).json()["data"] == []


def test_malformed_json_is_400_saying_where(client, auth) -> None:
    response = client.post("/v1/jobs", headers={**auth, "Content-Type": "application/json"}, content=b"{not json")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_request" and error["message"].startswith("malformed JSON body")
    assert "line 1" in error["message"]


@pytest.mark.parametrize(("content", "content_type"), [
    (b'["a", "list"]', "application/json"),
    (b"model_id=x", "application/x-www-form-urlencoded"),
], ids=["json_list", "form_body"])
def test_malformed_job_body_is_422(client, auth, content: bytes, content_type: str) -> None:
    response = client.post("/v1/jobs", headers={**auth, "Content-Type": content_type}, content=content)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
