"""Tests for app.core.vetting.detect: uploads are told apart by content, and pickled or unknown files are refused
without executing anything."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.core.vetting.detect import SUPPORTED_FORMATS, detect_format
from app.core.vetting.pickles import scan_pickle
from app.core.vetting.pt2 import vet_pt2
from app.core.vetting.refusals import UnsafeModelFile, UnsupportedModelFile
from tests.app.core.vetting.modelfile_builders import SystemCall, TinyMLP, torch_save_bytes, write_zip

REPO_ROOT = Path(__file__).resolve().parents[4]


def onnx_model_bytes() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(torch.randn(16, 4).numpy(), name="w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializer=[weight],
    )
    model = helper.make_model(graph, producer_name="modelpress-tests", opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


# --- accepted formats -------------------------------------------------------------------


def test_real_pt2_is_detected_and_vetted(pt2_path: Path) -> None:
    vet_pt2(pt2_path)
    assert detect_format(pt2_path, "model.pt2", None) == "pt2"
    assert detect_format(pt2_path, None, "pt2") == "pt2"


def test_onnx_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "upload.bin"
    path.write_bytes(onnx_model_bytes())
    assert detect_format(path, "model.onnx", None) == "onnx"
    assert detect_format(path, None, "onnx") == "onnx"


# --- pickled models ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        lambda: torch_save_bytes(TinyMLP()),
        lambda: torch_save_bytes(TinyMLP().state_dict()),
        lambda: torch_save_bytes(TinyMLP(), _use_new_zipfile_serialization=False),
        lambda: pickle.dumps({"weights": [1.0, 2.0]}, protocol=0),
    ],
    ids=["whole-module", "state-dict", "legacy-stream", "protocol-0"],
)
def test_pickled_pytorch_objects_are_refused(tmp_path: Path, payload: Callable[[], bytes]) -> None:
    path = tmp_path / "model.pt2"
    path.write_bytes(payload())
    with pytest.raises(UnsupportedModelFile) as refused:
        detect_format(path, "model.pt2", "pt2")
    assert refused.value.code == "pickled_model"
    assert "runs code" in refused.value.message
    assert "torch.export.save" in refused.value.message and "onnx" in refused.value.message


def test_raw_malicious_pickle_is_refused_without_running(tmp_path: Path, marker: Path) -> None:
    payload = pickle.dumps(SystemCall(f"touch {marker}"))
    path = tmp_path / "model.bin"
    path.write_bytes(payload)
    with pytest.raises(UnsupportedModelFile) as refused:
        detect_format(path, "model.bin", None)
    assert refused.value.code == "pickled_model"
    with pytest.raises(UnsafeModelFile, match=r"references 'posix\.system'"):
        scan_pickle(payload, "model.bin")


# --- declared formats and other uploads -------------------------------------------------


def test_declared_format_mismatch(pt2_path: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelFile) as refused:
        detect_format(pt2_path, "model.onnx", "onnx")
    assert refused.value.code == "format_mismatch"
    assert refused.value.message == "declared format onnx but the file is a pt2 archive"

    onnx_path = tmp_path / "model.pt2"
    onnx_path.write_bytes(onnx_model_bytes())
    with pytest.raises(UnsupportedModelFile) as refused:
        detect_format(onnx_path, "model.pt2", "pt2")
    assert refused.value.code == "format_mismatch"


def test_unknown_declared_format(pt2_path: Path) -> None:
    with pytest.raises(UnsupportedModelFile) as refused:
        detect_format(pt2_path, "model.tflite", "tflite")
    assert refused.value.code == "unsupported_format"
    assert all(fmt in refused.value.message for fmt in SUPPORTED_FORMATS)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt2"
    path.touch()
    with pytest.raises(UnsupportedModelFile) as refused:
        detect_format(path, "empty.pt2", None)
    assert refused.value.code == "empty_file"


def test_truncated_zip_is_corrupt(pt2_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.pt2"
    path.write_bytes(pt2_path.read_bytes()[:-200])
    with pytest.raises(UnsupportedModelFile) as refused:
        detect_format(path, "cut.pt2", None)
    assert refused.value.code == "corrupt_archive"


@pytest.mark.parametrize(
    "content",
    [
        random.Random(0).randbytes(4096),
        b"\x08\x07garbage after an ir_version",
        b"hello, this is not a model\n",
        write_zip([("a.txt", b"x")]),
    ],
    ids=["random", "onnx-tag-then-junk", "text", "plain-zip"],
)
def test_unrecognised_content(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(UnsupportedModelFile) as refused:
        detect_format(path, "model.onnx", None)
    assert refused.value.code == "unsupported_format"
    assert "pt2" in refused.value.message and "onnx" in refused.value.message


def test_import_does_not_load_ml_libraries() -> None:
    script = (
        "import sys, app.core.vetting.detect, app.core.vetting.hf, app.core.vetting.pickles, app.core.vetting.pt2\n"
        "import app.core.vetting.refusals, app.core.vetting.zips\n"
        "loaded = {'torch', 'numpy', 'onnx', 'onnxruntime', 'transformers'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=True)
