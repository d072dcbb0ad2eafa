"""A torch.export archive that carries native code: an AOTInductor package (a shared library under
<root>/data/aotinductor/<name>/ with a *_metadata.json beside it) makes torch.export.load dlopen the library,
whose constructor then runs. The archive is refused by its members, at upload and in the worker, and the
library is never loaded."""

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.helpers import save_pt2
from tests.hostile.builders import zip_bytes

CONSTRUCTOR = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("ran", f); fclose(f); }
}
"""


def shared_library(tmp_path: Path, marker: Path) -> bytes:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the planted shared library")
    source = tmp_path / "planted.c"
    source.write_text(CONSTRUCTOR % marker)
    library = tmp_path / "planted.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library.read_bytes()


def pt2_with_native_library(tmp_path: Path, marker: Path) -> bytes:
    """A real torch.export.save archive plus an AOTInductor package for model 'model'."""
    with zipfile.ZipFile(save_pt2(tmp_path / "good.pt2")) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    root = members[0][0].split("/", 1)[0]
    package = f"{root}/data/aotinductor/model"
    return zip_bytes([*members, (f"{package}/model.so", shared_library(tmp_path, marker)),
                      (f"{package}/model_metadata.json", b'{"AOTI_DEVICE_KEY": "cpu"}')])


def test_the_library_really_runs_when_loaded(tmp_path: Path, marker: Path) -> None:
    """Guards the tests below: loading the planted library does write the marker."""
    import ctypes

    library = tmp_path / "check.so"
    library.write_bytes(shared_library(tmp_path, marker))
    ctypes.CDLL(str(library))
    assert marker.read_text() == "ran"


def test_native_library_in_a_pt2_upload_is_415(upload, client, auth, tmp_path: Path, marker: Path) -> None:
    response = upload(pt2_with_native_library(tmp_path, marker), filename="model.pt2")
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_format"
    assert "data/aotinductor/model/model.so" in error["message"]
    assert not marker.exists()
    assert client.get("/v1/models", headers=auth).json()["data"] == []


def test_native_library_that_bypassed_the_api_is_refused_in_the_worker(tmp_path: Path, add_model, add_job, worker,
                                                                       marker: Path) -> None:
    path = tmp_path / "evil.pt2"
    path.write_bytes(pt2_with_native_library(tmp_path, marker))
    model = add_model(path, "pt2")
    inspected = worker.inspect(model.id)
    assert inspected.status == "invalid" and "aotinductor" in inspected.error
    job = worker.run(add_job(model))
    assert job.status == "failed" and job.error_code in ("unsupported_format", "model_invalid")
    assert not marker.exists()
    assert worker.leftovers() == []
