"""Tests for app.core.vetting.hf: Hugging Face model archives (zip and tar.gz), checked through detect_format as
an upload is, without extracting them."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from app.core.vetting.detect import detect_format, stored_extension
from app.core.vetting.hf import MAX_CONFIG_BYTES
from app.core.vetting.refusals import UnsupportedModelFile
from tests.app.core.vetting.modelfile_builders import write_zip

HF_CONFIG = json.dumps({"model_type": "bert", "architectures": ["BertModel"]}).encode()


def write_tar_gz(items: Iterable[tuple[str, bytes]], path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def hf_archives(tmp_path: Path, files: list[tuple[str, bytes]]) -> list[Path]:
    """The same Hugging Face directory as a zip and as a tar.gz."""
    zip_path = tmp_path / "bert.zip"
    write_zip(files, zip_path)
    return [zip_path, write_tar_gz(files, tmp_path / "bert.tar.gz")]


@pytest.mark.parametrize("top", ["bert/", ""], ids=["in-a-folder", "at-the-top"])
def test_hugging_face_zip_and_tar_gz_are_detected(tmp_path: Path, top: str) -> None:
    files = [(f"{top}config.json", HF_CONFIG), (f"{top}model.safetensors", b"\0" * 64),
             (f"{top}tokenizer.json", b"{}")]
    for path, extension in zip(hf_archives(tmp_path, files), ["zip", "tar.gz"]):
        assert detect_format(path, path.name, None) == "hf"
        assert detect_format(path, path.name, "hf") == "hf"
        assert stored_extension(path, "hf") == extension


def test_hugging_face_pytorch_model_bin_is_left_to_the_worker(tmp_path: Path) -> None:
    files = [("bert/config.json", HF_CONFIG), ("bert/pytorch_model.bin", b"PK\x03\x04")]
    for path in hf_archives(tmp_path, files):
        assert detect_format(path, path.name, None) == "hf"


@pytest.mark.parametrize(
    ("files", "code"),
    [
        ([("bert/config.json", json.dumps({"model_type": "x", "auto_map": {"AutoModel": "m.X"}}).encode()),
          ("bert/model.safetensors", b"\0")], "remote_code_refused"),
        ([("bert/config.json", json.dumps({"model_type": "x", "trust_remote_code": True}).encode()),
          ("bert/model.safetensors", b"\0")], "remote_code_refused"),
        ([("bert/config.json", HF_CONFIG), ("bert/model.safetensors", b"\0"),
          ("bert/tokenizer_config.json", json.dumps({"auto_map": {"AutoTokenizer": ["t.T", None]}}).encode())],
         "remote_code_refused"),
        ([("bert/config.json", HF_CONFIG), ("bert/vocab.txt", b"[PAD]")], "missing_weights"),
        ([("bert/config.json", HF_CONFIG), ("bert/sub/model.safetensors", b"\0")], "missing_weights"),
        ([("bert/config.json", b"{not json"), ("bert/model.safetensors", b"\0")], "invalid_config"),
        ([("bert/config.json", b"[1, 2]"), ("bert/model.safetensors", b"\0")], "invalid_config"),
        ([("a/config.json", HF_CONFIG), ("b/model.safetensors", b"\0")], "missing_config"),
        ([("bert/config.json", HF_CONFIG), ("bert/../../evil.safetensors", b"\0")], "unsafe_archive"),
        ([("bert/config.json", b" " * (MAX_CONFIG_BYTES + 1)), ("bert/model.safetensors", b"\0")],
         "archive_too_large"),
    ],
    ids=["auto_map", "trust_remote_code", "tokenizer-auto_map", "no-weights", "weights-not-at-root", "bad-json",
         "not-an-object", "config-not-at-root", "traversal", "huge-config"],
)
def test_hugging_face_archive_refusals(tmp_path: Path, files: list[tuple[str, bytes]], code: str) -> None:
    for path in hf_archives(tmp_path, files):
        with pytest.raises(UnsupportedModelFile) as refused:
            detect_format(path, path.name, None)
        assert refused.value.code == code, refused.value.message
        assert path.name in refused.value.message


def test_tar_without_config_is_refused(tmp_path: Path) -> None:
    path = write_tar_gz([("notes.txt", b"hello")], tmp_path / "notes.tar.gz")
    with pytest.raises(UnsupportedModelFile) as refused:
        detect_format(path, path.name, None)
    assert refused.value.code == "missing_config"


def test_hugging_face_archive_declared_as_another_format(tmp_path: Path) -> None:
    path = hf_archives(tmp_path, [("config.json", HF_CONFIG), ("model.safetensors", b"\0")])[0]
    with pytest.raises(UnsupportedModelFile) as refused:
        detect_format(path, path.name, "onnx")
    assert refused.value.code == "format_mismatch"
    assert refused.value.message == "declared format onnx but the file is a Hugging Face model archive"
