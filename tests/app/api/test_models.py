import hashlib
import pickle

import pytest


def test_upload_onnx_is_stored_hashed_and_listed(client, auth, upload, onnx_bytes):
    response = upload(name="my mlp")
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["format"] == "onnx"
    assert model["status"] == "uploaded"
    assert model["size_bytes"] == len(onnx_bytes)
    assert model["sha256"] == hashlib.sha256(onnx_bytes).hexdigest()
    assert model["name"] == "my mlp"
    assert client.get(f"/v1/models/{model['id']}", headers=auth).json()["id"] == model["id"]
    listed = client.get("/v1/models", headers=auth).json()
    assert [m["id"] for m in listed["data"]] == [model["id"]]
    assert listed["next_cursor"] is None


def test_upload_pt2_detected_from_content(upload, pt2_bytes):
    response = upload(pt2_bytes, filename="anything.bin")
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "pt2"


def test_download_roundtrip_with_range_and_etag(client, auth, upload, onnx_bytes):
    model = upload().json()
    url = f"/v1/models/{model['id']}/download"
    full = client.get(url, headers=auth)
    assert full.status_code == 200
    assert full.content == onnx_bytes
    assert full.headers["etag"] == f'"{model["sha256"]}"'
    assert "attachment" in full.headers["content-disposition"]
    part = client.get(url, headers={**auth, "Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.content == onnx_bytes[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(onnx_bytes)}"
    suffix = client.get(url, headers={**auth, "Range": "bytes=-5"})
    assert suffix.content == onnx_bytes[-5:]
    assert client.get(url, headers={**auth, "Range": f"bytes={len(onnx_bytes)}-"}).status_code == 416
    assert client.get(url, headers={**auth, "If-None-Match": full.headers["etag"]}).status_code == 304


@pytest.mark.parametrize("header", ["items=0-1", "lines=1-2", "bytes=0-1,4-5", "Bytes = 0-1"])
def test_range_that_is_not_one_byte_range_gets_the_whole_body_or_that_range(client, auth, upload, onnx_bytes,
                                                                            header):
    """RFC 9110 14.2: a range unit the server does not know is ignored (200 with the whole body), not 416; units
    are case-insensitive."""
    model = upload().json()
    response = client.get(f"/v1/models/{model['id']}/download", headers={**auth, "Range": header})
    if header.lower().replace(" ", "").startswith("bytes=0-1") and "," not in header:
        assert response.status_code == 206 and response.content == onnx_bytes[:2]
    else:
        assert response.status_code == 200 and response.content == onnx_bytes
        assert "content-range" not in response.headers


def test_download_if_none_match_star_is_304(client, auth, upload):
    model = upload().json()
    response = client.get(f"/v1/models/{model['id']}/download", headers={**auth, "If-None-Match": "*"})
    assert response.status_code == 304 and response.content == b""


def test_delete_model_removes_it_and_its_file(client, auth, upload, settings):
    from app.core.storage import open_storage

    model = upload().json()
    storage = open_storage(settings.resolved_storage_url())
    assert storage.list_keys("tenants")
    assert client.delete(f"/v1/models/{model['id']}", headers=auth).status_code == 204
    assert client.get(f"/v1/models/{model['id']}", headers=auth).status_code == 404
    assert storage.list_keys("tenants") == []


def test_upload_over_limit_is_413_and_leaves_nothing(client, auth, upload, settings):
    response = upload(b"\x08\x07" + b"0" * (settings.max_upload_bytes + 10))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert client.get("/v1/models", headers=auth).json()["data"] == []
    assert list(settings.upload_tmp_dir().glob("upload-*")) == []


def test_pickled_module_is_refused_with_supported_formats(upload):
    response = upload(pickle.dumps({"weights": [1, 2, 3]}), filename="model.pt")
    assert response.status_code == 415
    body = response.json()["error"]
    assert body["code"] == "pickled_model"
    assert "onnx" in body["message"].lower() and "pt2" in body["message"].lower()


@pytest.mark.parametrize("data", [b"hello world, not a model", b"PK\x03\x04broken zip"])
def test_garbage_is_415(upload, data):
    response = upload(data, filename="x.onnx")
    assert response.status_code == 415
    assert response.json()["error"]["message"]


def test_empty_file_is_422_as_for_datasets(upload):
    response = upload(b"", filename="x.onnx")
    assert response.status_code == 422
    assert response.json()["error"] == {"code": "empty_file", "message": "'x.onnx' is empty"}


def test_declared_format_mismatch_is_415(upload):
    response = upload(format="pt2")
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "format_mismatch"


def test_upload_needs_multipart(client, auth):
    response = client.post("/v1/models", headers={**auth, "Content-Type": "application/json"}, content=b"{}")
    assert response.status_code == 415


def test_upload_without_file_part_is_422(client, auth):
    response = client.post("/v1/models", headers=auth, files={"name": (None, "x")})
    assert response.status_code == 422
    assert "file" in response.json()["error"]["message"]


def test_upload_with_unknown_field_is_422(upload):
    response = upload(colour="blue")
    assert response.status_code == 422
    assert "colour" in response.json()["error"]["message"]


def test_malformed_multipart_is_400(client, auth):
    response = client.post("/v1/models", content=b"--b\r\nContent-Disposition: form-data; name=\"file\"; "
                                                 b"filename=\"a\"\r\n\r\nabc",
                           headers={**auth, "Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400


def test_pagination_walks_all_models(client, auth, upload):
    ids = {upload().json()["id"] for _ in range(5)}
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/models", headers=auth, params=params).json()
        seen += [m["id"] for m in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert set(seen) == ids and len(seen) == 5
    assert seen == sorted(seen, reverse=True)  # newest first
    assert client.get("/v1/models", headers=auth, params={"limit": 500}).status_code == 422
    assert client.get("/v1/models", headers=auth, params={"cursor": "%%%"}).status_code == 400


def test_pt2_with_planted_pickle_is_refused_at_upload(upload, tmp_path):
    from tests.app.core.vetting.modelfile_builders import SystemCall, with_sample_inputs_pickle
    from tests.helpers import save_pt2

    marker = tmp_path / "pwned"
    evil = with_sample_inputs_pickle(save_pt2(tmp_path / "good.pt2"),
                                     pickle.dumps(SystemCall(f"touch {marker}"), protocol=2), tmp_path / "evil.pt2")
    response = upload(evil.read_bytes(), filename="evil.pt2")
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsafe_pickle"
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_hf_archive_upload_is_detected(upload, tmp_path, suffix):
    from tests.helpers import pack, save_tiny_bert

    folder = tmp_path / "bert"
    save_tiny_bert(folder)
    response = upload(pack(folder, tmp_path / f"bert{suffix}").read_bytes(), filename=f"bert{suffix}")
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "hf"


def test_hf_archive_with_remote_code_is_refused(upload, tmp_path):
    import json

    from tests.helpers import pack, save_tiny_bert

    folder = tmp_path / "bert"
    save_tiny_bert(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))
    response = upload(pack(folder, tmp_path / "bert.zip").read_bytes(), filename="bert.zip")
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "remote_code_refused"


def test_input_specs_form_field_is_stored_and_shown(client, auth, upload):
    import json

    specs = {"input": {"shape": [1, 512]}, "state": {"shape": [2, 1, 128], "batch_axis": 1}, "sr": {"value": 16000}}
    model = upload(input_specs=json.dumps(specs, indent=2))
    assert model.status_code == 201, model.text
    assert model.json()["input_specs"] == specs
    assert client.get(f"/v1/models/{model.json()['id']}", headers=auth).json()["input_specs"] == specs
    assert upload().json()["input_specs"] is None


@pytest.mark.parametrize("text, start", [
    ("{not json", "input_specs: not valid JSON"),
    ('{"sr": {"value": 1, "range": [0, 2]}}', "input_specs.sr: value: a constant excludes range"),
    ('{"x": {"shape": [1], "size": 3}}', "input_specs.x.size"),
    ('{"x": {"value": [' + ",".join(["1"] * 5000) + "]}}", "input_specs.x: value: more than 4096"),
])
def test_bad_input_specs_form_field_is_422_and_stores_nothing(client, auth, upload, text, start):
    response = upload(input_specs=text)
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith(start), response.json()
    assert client.get("/v1/models", headers=auth).json()["data"] == []
