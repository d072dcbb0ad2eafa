import json
import pathlib
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from app.core.vetting import dataset_files as datasets
from app.core.vetting.dataset_files import DatasetError, inspect_dataset


class TouchOnUnpickle:
    """Unpickling this creates `marker`: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def write_npz(path: Path, compressed: bool = False, **arrays) -> Path:
    with open(path, "wb") as file:  # a file object: numpy would add ".npz" to a name without it
        (np.savez_compressed if compressed else np.savez)(file, **arrays)
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def write_raw_safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def refused(path: Path) -> DatasetError:
    with pytest.raises(DatasetError) as caught:
        inspect_dataset(path, path.name)
    return caught.value


def test_npz_facts_come_from_headers(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.zeros((10, 4), np.float32), mask=np.ones((10, 4), bool),
                     labels=np.arange(10))
    facts = inspect_dataset(path, "d.npz")
    assert (facts.format, facts.num_samples, facts.has_labels) == ("npz", 10, True)
    assert facts.info == {"arrays": {"x": {"shape": [10, 4], "dtype": "float32"},
                                     "mask": {"shape": [10, 4], "dtype": "bool"},
                                     "labels": {"shape": [10], "dtype": "int64"}}}


def test_compressed_npz_without_labels(tmp_path):
    path = write_npz(tmp_path / "d.bin", compressed=True, ids=np.zeros((3, 8), np.int64))
    facts = inspect_dataset(path, "d.bin")
    assert (facts.format, facts.num_samples, facts.has_labels) == ("npz", 3, False)


def test_safetensors_facts_and_metadata_ignored(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"x": np.ones((5, 3), np.float16), "labels": np.arange(5, dtype=np.int32)}, str(path),
              metadata={"source": "test"})
    facts = inspect_dataset(path, path.name)
    assert (facts.format, facts.num_samples, facts.has_labels) == ("safetensors", 5, True)
    assert facts.info["arrays"]["x"] == {"shape": [5, 3], "dtype": "float16"}
    assert facts.info["arrays"]["labels"] == {"shape": [5], "dtype": "int32"}


def test_jsonl_with_labels_counts_them(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(datasets.UTF8_BOM + b'{"text": "good", "label": 1, "id": 7}\n\n{"text": "bad", "label": 0}\n'
                     b'{"text": "fine", "label": 1}')
    facts = inspect_dataset(path, path.name)
    assert (facts.format, facts.num_samples, facts.has_labels) == ("jsonl", 3, True)
    assert facts.info == {"num_labels": 2, "label_counts": {"0": 1, "1": 2}}


def test_jsonl_without_labels(tmp_path):
    facts = inspect_dataset(write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}]), "d.jsonl")
    assert (facts.num_samples, facts.has_labels, facts.info) == (2, False, {})


def test_object_npz_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    path = write_npz(tmp_path / "d.npz", x=np.array([TouchOnUnpickle(marker)] * 3, dtype=object))
    error = refused(path)
    assert error.code == "invalid_dataset"
    assert error.message.startswith("array 'x' has dtype object, which is not allowed")
    assert not marker.exists()


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((10, 2)), "labels": np.arange(12)}, "array 'labels' has 12 samples but 'x' has 10"),
    ({"x": np.zeros((10, 2)), "labels": np.zeros((10, 2), np.int64)},
     "array 'labels' must be 1-D (one class id per sample), got shape (10, 2)"),
    ({"x": np.zeros((4, 2)), "labels": np.zeros(4, np.float32)},
     "array 'labels' must hold integer class ids, got dtype float32"),
    ({"labels": np.arange(4)}, "the file holds only 'labels'; it needs at least one input array"),
    ({"x": np.array(["a", "b"])}, "array 'x' has dtype <U1, which is not allowed"),
    ({"x": np.zeros((2, 2), np.complex64)}, "array 'x' has dtype complex64, which is not allowed"),
    ({"x": np.float32(1.0)}, "array 'x' is a scalar"),
    ({"x": np.zeros((0, 3))}, "array 'x' has no samples"),
    ({"x": np.zeros((3, 0))}, "array 'x' has an empty dimension"),
    ({}, "the file holds no arrays"),
])
def test_invalid_npz_names_the_problem(tmp_path, arrays, message):
    error = refused(write_npz(tmp_path / "d.npz", **arrays))
    assert error.code == "invalid_dataset"
    assert error.message.startswith(message), error.message


def test_npz_member_limit(tmp_path):
    path = write_npz(tmp_path / "d.npz", **{f"a{i}": np.zeros(2) for i in range(datasets.MAX_ARRAYS + 1)})
    assert f"at most {datasets.MAX_ARRAYS} arrays" in refused(path).message


def test_oversized_zip_directory_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_ZIP_DIRECTORY_BYTES", 16)
    error = refused(write_npz(tmp_path / "d.npz", x=np.zeros(2)))
    assert "directory is" in error.message and error.code == "invalid_dataset"


def test_truncated_npy_member_is_refused(tmp_path):
    full = tmp_path / "x.npy"
    np.save(full, np.zeros((10, 4), np.float32))
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", full.read_bytes()[:-8])
    assert refused(path).message == ("array 'x' holds 152 data bytes, but its header describes 160 "
                                     "(shape (10, 4), dtype float32)")


def test_zip_that_is_not_npz_is_unsupported(tmp_path):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"")
        archive.writestr("readme.txt", b"hello")
    error = refused(path)
    assert error.code == "unsupported_format"
    assert "member 'readme.txt' is not a .npy array" in error.message


def test_broken_zip_is_unsupported(tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    assert refused(path).code == "unsupported_format"


@pytest.mark.parametrize("header, data, message", [
    ({"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "tensor 'x' has dtype BF16"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4,
     "tensor 'x' has 4 data bytes, but shape (2,) of F32 needs 8"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4,
     "tensor 'x': 'data_offsets' must be [begin, end] within the 4 data bytes"),
    ({"x": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}, b"\0" * 8,
     "tensor 'x': 'shape' must be a list of non-negative integers"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "labels": {"dtype": "I64", "shape": [3], "data_offsets": [8, 32]}}, b"\0" * 32,
     "array 'labels' has 3 samples but 'x' has 2"),
    ({"x": "nope"}, b"", "tensor 'x': header entry is not an object"),
])
def test_invalid_safetensors_names_the_problem(tmp_path, header, data, message):
    error = refused(write_raw_safetensors(tmp_path / "d.safetensors", header, data))
    assert error.code == "invalid_dataset"
    assert error.message.startswith(message), error.message


def test_safetensors_header_past_the_end_is_refused(tmp_path):
    path = tmp_path / "d.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b'{"x": {}}')
    assert refused(path).message == "safetensors header length 1000 runs past the end of the file (17 bytes)"


def test_safetensors_header_size_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_SAFETENSORS_HEADER_BYTES", 10)
    path = tmp_path / "d.safetensors"
    save_file({"x": np.ones((5, 3), np.float32)}, str(path))
    assert "at most 10 are allowed" in refused(path).message


@pytest.mark.parametrize("lines, message", [
    ([{"text": "a"}, {"text": ""}], "line 2: 'text' must be a non-empty string"),
    ([{"text": "a"}, "", {"text": 3}], "line 3: 'text' must be a non-empty string"),
    ([{"label": 1}], "line 1: 'text' must be a non-empty string"),
    ([{"text": "a"}, "{not json"], "line 2: not valid JSON"),
    ([{"text": "a"}, "[1, 2]"], "line 2: expected a JSON object, got list"),
    ([{"text": "a", "label": "pos"}], "line 1: 'label' must be an integer class id"),
    ([{"text": "a", "label": True}], "line 1: 'label' must be an integer class id"),
    ([{"text": "a", "label": -1}], "line 1: 'label' must be an integer class id"),
    ([{"text": "a", "label": 1}, {"text": "b"}],
     "line 2 has no 'label' but earlier lines do; either every line has a label or none does"),
    ([{"text": "a"}, {"text": "b", "label": 0}],
     "line 2 has 'label' but earlier lines do not; either every line has a label or none does"),
    (['{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"], "line 1: not valid JSON"),
])
def test_invalid_jsonl_names_the_line(tmp_path, lines, message):
    error = refused(write_jsonl(tmp_path / "d.jsonl", lines))
    assert error.code == "invalid_dataset"
    assert error.message.startswith(message), error.message


def test_jsonl_line_length_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_LINE_BYTES", 64)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "short"}, {"text": "x" * 100}])
    assert refused(path).message == "line 2 is longer than 64 bytes"


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    assert refused(path).message == "line 2: not valid UTF-8"


def test_empty_file(tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(b"")
    error = refused(path)
    assert (error.code, error.message) == ("empty_file", "'d.npz' is empty")


@pytest.mark.parametrize("content", [b"hello, not a dataset", b"x,y\n1,2\n", b"\x00" * 64, b"   \n\n"])
def test_unknown_content_names_supported_formats(tmp_path, content):
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    error = refused(path)
    assert error.code == "unsupported_format"
    assert "'d.csv' is not a dataset this service reads" in error.message
    assert all(fmt in error.message for fmt in ("npz", "safetensors", "jsonl"))


def test_jsonl_whose_ninth_byte_is_a_brace_is_still_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(datasets.UTF8_BOM + b'{"a": {"b": 1}}\n')
    assert refused(path).message == "line 1: 'text' must be a non-empty string"
