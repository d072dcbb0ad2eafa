"""Datasets: values the API never reads (NaN, inf), arrays that do not fit the model, labels outside the model's
classes, dtypes no model takes, empty files. Refused at upload (422) when the headers show it, otherwise the job
that uses the dataset fails with `invalid_dataset` and a reason naming the array, the sample or the shapes."""

import io
import json

import numpy as np
import pytest

RNG = np.random.default_rng(0)
GOOD_X = RNG.standard_normal((12, 16)).astype(np.float32)  # the test models take float32 [4, 16], 4 classes
QUANTIZE = {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]}
FINETUNE = {"steps": [{"op": "finetune", "epochs": 1, "batch_size": 4}]}


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def with_value(value: float, sample: int) -> np.ndarray:
    x = GOOD_X.copy()
    x[sample, 5] = value
    return x


@pytest.fixture
def upload_dataset(client, auth):
    def _upload(data: bytes, filename: str = "data.npz"):
        return client.post("/v1/datasets", headers=auth, files={"file": (filename, data)})

    return _upload


@pytest.mark.parametrize(("data", "filename", "code", "reason"), [
    (b"", "data.npz", "empty_file", "is empty"),
    (npz(x=GOOD_X.astype(np.complex64)), "data.npz", "invalid_dataset", "array 'x' has dtype complex64"),
    (npz(x=np.array([["a", "b"]] * 12)), "data.npz", "invalid_dataset", "array 'x' has dtype <U1"),
    (npz(x=GOOD_X, labels=np.zeros(12, np.float32)), "data.npz", "invalid_dataset", "must hold integer class ids"),
    (npz(x=GOOD_X, labels=np.zeros((12, 2), np.int64)), "data.npz", "invalid_dataset", "'labels' must be 1-D"),
    (npz(x=GOOD_X, labels=np.zeros(11, np.int64)), "data.npz", "invalid_dataset", "has 11 samples but 'x' has 12"),
    (npz(x=np.float32(1.0)), "data.npz", "invalid_dataset", "array 'x' is a scalar"),
    (npz(x=np.zeros((0, 16), np.float32)), "data.npz", "invalid_dataset", "array 'x' has no samples"),
    (b'{"text": "hi", "label": -1}\n', "data.jsonl", "invalid_dataset", "line 1: 'label' must be an integer"),
    (b'{"text": "hi", "label": 2.5}\n', "data.jsonl", "invalid_dataset", "line 1: 'label' must be an integer"),
    (b'{"text": ""}\n', "data.jsonl", "invalid_dataset", "line 1: 'text' must be a non-empty string"),
], ids=["empty_file", "complex_dtype", "string_dtype", "float_labels", "2d_labels", "sample_count_mismatch",
        "scalar", "no_samples", "negative_jsonl_label", "fractional_jsonl_label", "empty_text"])
def test_dataset_refused_at_upload_is_422(client, auth, upload_dataset, data: bytes, filename: str, code: str,
                                          reason: str) -> None:
    response = upload_dataset(data, filename)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == code and reason in error["message"]
    assert client.get("/v1/datasets", headers=auth).json()["data"] == []


@pytest.mark.parametrize(("arrays", "role", "reason"), [
    ({"x": with_value(np.nan, 3)}, "eval", "array 'x' has NaN values, first at sample 3"),
    ({"x": with_value(np.inf, 7)}, "calibration", "array 'x' has inf values, first at sample 7"),
    ({"x": GOOD_X[:, :7]}, "eval", "array 'x' has shape (12, 7) per-sample (7,), but model input"),
    ({"x": GOOD_X[:, None, :]}, "eval", "array 'x' has shape (12, 1, 16)"),
    ({"x": GOOD_X, "labels": np.arange(12) % 4 - 1}, "eval",
     "array 'labels' has a negative class id at sample 0"),
    ({"x": GOOD_X, "labels": np.arange(12) % 4 + 3}, "eval",
     "eval dataset: label 4 at sample 1 is out of range: the model's first output has 4 classes"),
], ids=["nan", "inf", "wrong_width", "wrong_rank", "negative_label", "label_past_the_classes"])
def test_dataset_that_cannot_feed_the_model_fails_the_job(client, auth, upload, upload_dataset, worker_for_api,
                                                          arrays: dict, role: str, reason: str) -> None:
    model_id = upload(filename="mlp.onnx").json()["id"]
    dataset = upload_dataset(npz(**arrays))
    assert dataset.status_code == 201, dataset.text  # its values and fit are only known once a job uses it
    recipe = ({"steps": [{"op": "quantize", "method": "static", "dtype": "int8"}]} if role == "calibration"
              else QUANTIZE)
    submitted = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "recipe": recipe,
                                                            "datasets": {role: dataset.json()["id"]}})
    assert submitted.status_code == 201, submitted.text
    job = worker_for_api.run(submitted.json()["id"])
    assert job.status == "failed" and job.error_code == "invalid_dataset"
    assert reason in job.error_message
    shown = client.get(f"/v1/jobs/{job.id}", headers=auth).json()
    assert shown["error"] == {"code": "invalid_dataset", "message": job.error_message}


def test_training_labels_past_the_classes_fail_the_job(client, auth, upload, upload_dataset, worker_for_api,
                                                       pt2_bytes: bytes) -> None:
    model_id = upload(pt2_bytes, filename="mlp.pt2").json()["id"]
    dataset = upload_dataset(npz(x=GOOD_X, labels=np.full(12, 9)))
    submitted = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "recipe": FINETUNE,
                                                            "datasets": {"train": dataset.json()["id"]}})
    assert submitted.status_code == 201, submitted.text
    job = worker_for_api.run(submitted.json()["id"])
    assert job.status == "failed" and job.error_code == "invalid_dataset"
    assert "train dataset: label 9 at sample 0 is out of range" in job.error_message


def test_jsonl_for_a_model_without_tokenizer_fails_the_job(client, auth, upload, upload_dataset,
                                                           worker_for_api) -> None:
    model_id = upload(filename="mlp.onnx").json()["id"]
    dataset = upload_dataset(json.dumps({"text": "hello", "label": 1}).encode() + b"\n", "data.jsonl")
    assert dataset.status_code == 201, dataset.text
    submitted = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "recipe": QUANTIZE,
                                                            "datasets": {"eval": dataset.json()["id"]}})
    job = worker_for_api.run(submitted.json()["id"])
    assert job.status == "failed" and job.error_code == "invalid_dataset"
    assert "a .jsonl text dataset needs a Hugging Face model that ships its tokenizer" in job.error_message
