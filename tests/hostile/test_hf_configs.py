"""Hugging Face configs: custom code (auto_map / trust_remote_code, at any depth, in config.json or
tokenizer_config.json), architectures transformers does not ship, missing weights or config. Refused at upload
(415) when the archive listing shows it, otherwise `invalid` once the worker read the config; the shipped code
never runs."""

import json
from pathlib import Path

import pytest

from tests.hostile.builders import TINY_CONFIG, hf_files, hf_zip

REMOTE_CODE = {
    "auto_map": ("config.json", {**TINY_CONFIG, "auto_map": {"AutoModel": "modeling_evil.EvilModel"}}),
    "trust_remote_code": ("config.json", {**TINY_CONFIG, "trust_remote_code": True}),
    "nested_auto_map": ("config.json", {**TINY_CONFIG, "text_config": {"auto_map": {"AutoModel": "modeling_evil.M"}}}),
    "tokenizer_auto_map": ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["modeling_evil.T", None]}}),
}


def with_remote_code(kind: str, marker: Path) -> bytes:
    """The archive ships modeling_evil.py, which writes the marker if anything ever imports it."""
    name, document = REMOTE_CODE[kind]
    return hf_zip({**hf_files(), name: json.dumps(document).encode(),
                   "modeling_evil.py": f"open({str(marker)!r}, 'w').close()\n".encode()})


def without(name: str) -> bytes:
    files = hf_files()
    del files[name]
    return hf_zip(files)


@pytest.mark.parametrize("kind", REMOTE_CODE)
def test_remote_code_upload_is_415(client, auth, upload, marker: Path, kind: str) -> None:
    response = upload(with_remote_code(kind, marker), filename="bert.zip")
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "remote_code_refused"
    assert REMOTE_CODE[kind][0] in error["message"] and "never done here" in error["message"]
    assert client.get("/v1/models", headers=auth).json()["data"] == []
    assert not marker.exists()


@pytest.mark.parametrize("kind", REMOTE_CODE)
def test_remote_code_that_bypassed_the_api_is_invalid(tmp_path: Path, add_model, add_job, worker, marker: Path,
                                                      kind: str) -> None:
    path = tmp_path / "bert.zip"
    path.write_bytes(with_remote_code(kind, marker))
    model = add_model(path, "hf")
    job = worker.run(add_job(model))
    assert job.status == "failed" and job.error_code == "remote_code_refused"
    assert not marker.exists()
    inspected = worker.inspect(model.id)
    assert inspected.status == "invalid" and f"{REMOTE_CODE[kind][0]} sets" in inspected.error
    assert not marker.exists()
    assert worker.leftovers() == []


@pytest.mark.parametrize(("archive", "code"), [
    (without("model.safetensors"), "missing_weights"),
    (without("config.json"), "unsupported_format"),  # a zip without config.json is not taken for a model
    (hf_zip({**hf_files(), "config.json": b"{not json"}), "invalid_config"),
    (hf_zip({**hf_files(), "config.json": b"[1, 2]"}), "invalid_config"),
], ids=["missing_weights", "missing_config", "config_not_json", "config_not_an_object"])
def test_incomplete_or_broken_archive_upload_is_415(upload, archive: bytes, code: str) -> None:
    response = upload(archive, filename="bert.zip", format="hf")
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == code
    assert ("model.safetensors" if code == "missing_weights" else "config.json") in error["message"]


@pytest.mark.parametrize(("config", "reason"), [
    ({**TINY_CONFIG, "model_type": "totally-new-arch"}, "model_type 'totally-new-arch' is not an architecture"),
    ({key: value for key, value in TINY_CONFIG.items() if key != "model_type"}, "model_type None is not an"),
    ({**TINY_CONFIG, "architectures": ["BertModel"], "model_type": "gpt2"}, "does not match model_type 'gpt2'"),
], ids=["unknown_model_type", "no_model_type", "architecture_of_another_type"])
def test_unusable_architecture_is_invalid_after_inspection(client, auth, upload, worker_for_api, config: dict,
                                                           reason: str) -> None:
    """The API does not judge architectures; the worker does, before building anything."""
    response = upload(hf_zip(hf_files(config)), filename="bert.zip")
    assert response.status_code == 201, response.text
    model = worker_for_api.inspect(response.json()["id"])
    assert model.status == "invalid" and reason in model.error
    assert worker_for_api.leftovers() == []


def test_missing_weights_that_bypassed_the_api_is_invalid(tmp_path: Path, add_model, worker) -> None:
    path = tmp_path / "bert.zip"
    path.write_bytes(without("model.safetensors"))
    model = worker.inspect(add_model(path, "hf").id)
    assert model.status == "invalid" and model.error.startswith("no weights: expected model.safetensors")
