"""Pickles: a file whose loading would run code is refused at upload (415) or left `invalid` / `failed` by the
worker with a reason; the marker file written by the payload proves it never ran at any stage."""

import io
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import make_mlp, save_pt2
from tests.hostile.builders import WritesMarker, hf_files, hf_zip, zip_bytes

Build = Callable[[Path, Path], bytes]  # (scratch folder, marker path) -> file content
QUANTIZE = {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]}


def pickled_module(tmp_path: Path, marker: Path) -> bytes:
    """torch.save of a whole nn.Module that carries a payload in its attributes."""
    module = make_mlp()
    module.payload = WritesMarker(marker)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


def pt2_with_payload_inputs(tmp_path: Path, marker: Path) -> bytes:
    """A real torch.export archive whose sample inputs (a nested torch.save) carry the payload."""
    payload = io.BytesIO()
    torch.save({"x": WritesMarker(marker)}, payload)
    with zipfile.ZipFile(save_pt2(tmp_path / "good.pt2")) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    replaced = [(name, payload.getvalue() if "/data/sample_inputs/" in name else data) for name, data in members]
    assert replaced != members, "the archive has no sample inputs to replace"
    return zip_bytes(replaced)


def pt2_lookalike(tmp_path: Path, marker: Path) -> bytes:
    """Just enough of a pt2 archive to be taken for one (archive_format says pt2), plus a pickle."""
    return zip_bytes([("model/archive_format", b"pt2"), ("model/version", b"0"),
                      ("model/data.pkl", pickle.dumps(WritesMarker(marker), protocol=2))])


def hf_with_pickled_weights(marker: Path) -> bytes:
    """A Hugging Face directory whose pytorch_model.bin holds a payload instead of a tensor."""
    weights = io.BytesIO()
    torch.save({"embeddings.weight": WritesMarker(marker)}, weights)
    files = hf_files()
    del files["model.safetensors"]
    return hf_zip({**files, "pytorch_model.bin": weights.getvalue()})


def test_the_payload_really_runs_when_unpickled(marker: Path) -> None:
    """Guards the other tests: the marker they check for does appear when a payload is unpickled."""
    pickle.loads(pickle.dumps(WritesMarker(marker))).close()
    assert marker.exists()


def test_pickled_module_upload_is_415(upload, client, auth, tmp_path: Path, marker: Path) -> None:
    response = upload(pickled_module(tmp_path, marker), filename="model.pt")
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "pickled_model"
    assert "pt2" in error["message"] and "onnx" in error["message"]
    assert not marker.exists()
    assert client.get("/v1/models", headers=auth).json()["data"] == []


@pytest.mark.parametrize("build", [pt2_with_payload_inputs, pt2_lookalike], ids=lambda build: build.__name__)
def test_pickle_inside_a_pt2_zip_upload_is_415(upload, client, auth, tmp_path: Path, marker: Path,
                                               build: Build) -> None:
    response = upload(build(tmp_path, marker), filename="model.pt2")
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsafe_pickle"
    assert "open'" in error["message"] and "not allowed" in error["message"]
    assert not marker.exists()
    assert client.get("/v1/models", headers=auth).json()["data"] == []


@pytest.mark.parametrize("build", [pickled_module, pt2_with_payload_inputs, pt2_lookalike],
                         ids=lambda build: build.__name__)
def test_pickles_that_bypassed_the_api_fail_in_the_worker(tmp_path: Path, add_model, add_job, worker, marker: Path,
                                                          build: Build) -> None:
    """Stored as a pt2 without the API's vetting: the worker vets again before torch opens anything."""
    path = tmp_path / "evil.pt2"
    path.write_bytes(build(tmp_path, marker))
    model = add_model(path, "pt2")
    job = worker.run(add_job(model))
    assert job.status == "failed"
    assert job.error_code == "unsafe_pickle" and "not allowed" in job.error_message
    assert not marker.exists()
    inspected = worker.inspect(model.id)
    assert inspected.status == "invalid" and "not allowed" in inspected.error
    assert not marker.exists()
    assert worker.leftovers() == []


def test_pytorch_model_bin_payload_in_hf_archive(client, auth, upload, worker_for_api, marker: Path) -> None:
    """The API leaves pytorch_model.bin to the worker, whose weights-only loader refuses the payload."""
    response = upload(hf_with_pickled_weights(marker), filename="bert.zip")
    assert response.status_code == 201, response.text
    model_id = response.json()["id"]
    assert not marker.exists()

    submitted = client.post("/v1/jobs", headers=auth, json={"model_id": model_id, "recipe": QUANTIZE})
    assert submitted.status_code == 201, submitted.text
    job = worker_for_api.run(submitted.json()["id"])
    assert job.status == "failed"
    assert job.error_code == "unsafe_weights" and "pytorch_model.bin" in job.error_message
    assert not marker.exists()

    assert worker_for_api.inspect(model_id).status == "invalid"
    shown = client.get(f"/v1/models/{model_id}", headers=auth).json()
    assert shown["status"] == "invalid" and "pytorch_model.bin is not a plain state dict" in shown["error"]
    assert not marker.exists()
    assert worker_for_api.leftovers() == []
