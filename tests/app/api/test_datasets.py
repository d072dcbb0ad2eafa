import hashlib
import io
import json

import numpy as np
import pytest
from safetensors.numpy import save

from tests.app.core.vetting.test_dataset_files import TouchOnUnpickle

RECIPE = {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]}


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def jsonl_bytes(*records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


GOOD_NPZ = npz_bytes(x=np.random.default_rng(0).standard_normal((12, 16)).astype(np.float32),
                     labels=np.arange(12) % 4)


@pytest.fixture
def upload_dataset(client, auth):
    def _upload(data: bytes = GOOD_NPZ, filename: str = "data.npz", headers=None, **fields):
        return client.post("/v1/datasets", headers=headers or auth, files={"file": (filename, data)}, data=fields)

    return _upload


def storage_keys(settings) -> list[str]:
    from app.core.storage import open_storage

    return open_storage(settings.resolved_storage_url()).list_keys("tenants")


def test_upload_npz_get_list_delete(client, auth, upload_dataset, settings):
    response = upload_dataset(name="calib")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["id"].startswith("ds_")
    assert (dataset["name"], dataset["format"], dataset["num_samples"], dataset["has_labels"]) == (
        "calib", "npz", 12, True)
    assert dataset["size_bytes"] == len(GOOD_NPZ)
    assert dataset["sha256"] == hashlib.sha256(GOOD_NPZ).hexdigest()
    assert dataset["info"]["arrays"]["x"] == {"shape": [12, 16], "dtype": "float32"}
    assert dataset["created_at"].endswith("Z") or "+00:00" in dataset["created_at"]
    keys = storage_keys(settings)
    assert len(keys) == 1 and keys[0].endswith(f"/datasets/{dataset['id']}/data.npz")

    assert client.get(f"/v1/datasets/{dataset['id']}", headers=auth).json() == dataset
    listed = client.get("/v1/datasets", headers=auth).json()
    assert listed == {"data": [dataset], "next_cursor": None}

    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=auth).status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=auth).status_code == 404
    assert storage_keys(settings) == []


def test_upload_safetensors(upload_dataset):
    data = save({"input_ids": np.ones((3, 8), np.int64), "attention_mask": np.ones((3, 8), np.int64)})
    response = upload_dataset(data, filename="tokens.safetensors")
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["format"], body["num_samples"], body["has_labels"], body["name"]) == (
        "safetensors", 3, False, "tokens.safetensors")


def test_upload_jsonl(upload_dataset):
    data = jsonl_bytes({"text": "great", "label": 1}, {"text": "awful", "label": 0}, {"text": "fine", "label": 1})
    response = upload_dataset(data, filename="reviews.jsonl")
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["format"], body["num_samples"], body["has_labels"]) == ("jsonl", 3, True)
    assert body["info"] == {"num_labels": 2, "label_counts": {"0": 1, "1": 2}}


def test_pagination_walks_all_datasets(client, auth, upload_dataset):
    ids = {upload_dataset().json()["id"] for _ in range(3)}
    first = client.get("/v1/datasets", headers=auth, params={"limit": 2}).json()
    second = client.get("/v1/datasets", headers=auth, params={"limit": 2, "cursor": first["next_cursor"]}).json()
    seen = [d["id"] for d in first["data"] + second["data"]]
    assert set(seen) == ids and seen == sorted(seen, reverse=True)
    assert second["next_cursor"] is None


@pytest.mark.parametrize("data", [b"hello, not a dataset", b"PK\x03\x04broken zip", b"\x00" * 32])
def test_unrecognised_content_is_415(upload_dataset, data, settings):
    response = upload_dataset(data, filename="x.npz")
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_format"
    assert "npz" in error["message"] and "safetensors" in error["message"] and "jsonl" in error["message"]
    assert storage_keys(settings) == []


@pytest.mark.parametrize("data, code, message", [
    (npz_bytes(x=np.zeros((10, 2)), labels=np.arange(12)), "invalid_dataset",
     "array 'labels' has 12 samples but 'x' has 10"),
    (npz_bytes(x=np.zeros((10, 2)), labels=np.zeros((10, 2), np.int64)), "invalid_dataset",
     "array 'labels' must be 1-D (one class id per sample), got shape (10, 2)"),
    (jsonl_bytes({"text": "a"}, {"text": "b"}, {"text": ""}), "invalid_dataset",
     "line 3: 'text' must be a non-empty string"),
    (jsonl_bytes({"text": "a", "label": 0}, {"text": "b"}), "invalid_dataset",
     "line 2 has no 'label' but earlier lines do"),
    (b"", "empty_file", "'data.npz' is empty"),
])
def test_invalid_dataset_is_422_naming_the_problem(upload_dataset, settings, data, code, message):
    response = upload_dataset(data)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"].startswith(message), error["message"]
    assert storage_keys(settings) == []


def test_object_npz_is_422_and_never_unpickled(upload_dataset, tmp_path):
    marker = tmp_path / "unpickled"
    response = upload_dataset(npz_bytes(x=np.array([TouchOnUnpickle(marker)] * 2, dtype=object)))
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("array 'x' has dtype object, which is not allowed")
    assert not marker.exists()


def test_upload_over_limit_is_413(client, auth, upload_dataset, settings):
    response = upload_dataset(b"{" + b" " * (settings.max_upload_bytes + 10))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert client.get("/v1/datasets", headers=auth).json()["data"] == []
    assert list(settings.upload_tmp_dir().glob("upload-*")) == []


def test_unknown_form_field_is_422(upload_dataset):
    response = upload_dataset(format="npz")
    assert response.status_code == 422
    assert "format" in response.json()["error"]["message"]


def test_delete_is_409_while_a_queued_job_uses_it(client, auth, upload, upload_dataset, settings):
    dataset = upload_dataset().json()
    model = upload().json()
    job = client.post("/v1/jobs", headers=auth, json={"model_id": model["id"], "recipe": RECIPE,
                                                      "datasets": {"eval": dataset["id"]}})
    assert job.status_code == 201, job.text
    assert job.json()["datasets"]["eval"] == dataset["id"]
    response = client.delete(f"/v1/datasets/{dataset['id']}", headers=auth)
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "dataset_in_use" and job.json()["id"] in error["message"]
    assert len(storage_keys(settings)) == 2  # the dataset and the model are both still there

    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=auth).status_code == 202
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=auth).status_code == 204


def test_job_with_unknown_dataset_is_404_naming_the_field(client, auth, upload):
    model = upload().json()
    response = client.post("/v1/jobs", headers=auth, json={"model_id": model["id"], "recipe": RECIPE,
                                                           "datasets": {"eval": "ds_nope"}})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "datasets.eval: dataset 'ds_nope' not found"


def test_other_tenants_datasets_are_404(client, make_key, upload, upload_dataset):
    alice, bob = make_key(), make_key()
    dataset = upload_dataset(headers=alice).json()
    path = f"/v1/datasets/{dataset['id']}"
    assert client.get(path, headers=bob).status_code == 404
    assert client.delete(path, headers=bob).status_code == 404
    assert client.get("/v1/datasets", headers=bob).json()["data"] == []
    bobs_model = upload(headers=bob).json()
    response = client.post("/v1/jobs", headers=bob, json={"model_id": bobs_model["id"], "recipe": RECIPE,
                                                          "datasets": {"eval": dataset["id"]}})
    assert response.status_code == 404
    assert response.json()["error"]["message"].startswith("datasets.eval:")
    assert client.get(path, headers=alice).status_code == 200
