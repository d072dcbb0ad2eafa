"""Tests for app.core.vetting.modelfiles: format detection and pickle vetting without executing anything."""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import json
import os
import pickle
import random
import subprocess
import sys
import tarfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import torch

from app.core.vetting.modelfiles import (
    ALLOWED_GLOBALS,
    MAX_CONFIG_BYTES,
    SUPPORTED_FORMATS,
    UnsafeModelFile,
    UnsupportedModelFile,
    detect_format,
    scan_pickle,
    stored_extension,
    vet_pt2,
)

REPO_ROOT = Path(__file__).resolve().parents[4]


class TinyMLP(torch.nn.Module):
    """An MLP plus an int8 buffer whose raw bytes start like a pickle (0x80 0x02)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 8)
        self.fc2 = torch.nn.Linear(8, 2)
        self.register_buffer("offsets", torch.tensor([-128, 2, 3], dtype=torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) + self.offsets[:2].float()


class SystemCall:
    """Unpickling this runs os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


class ExecCall:
    """Unpickling this runs exec(code)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (self.code,))


@pytest.fixture(scope="module")
def pt2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    exported = torch.export.export(TinyMLP(), (torch.randn(2, 16),))
    torch.export.save(exported, path)
    return path


@pytest.fixture()
def marker(tmp_path: Path) -> Iterator[Path]:
    """A file that only a successfully executed payload would create."""
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a payload was executed"


def read_zip(path: Path | bytes) -> dict[str, bytes]:
    source = io.BytesIO(path) if isinstance(path, bytes) else path
    with zipfile.ZipFile(source) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def write_zip(items: Iterable[tuple[str, bytes]], path: Path | None = None) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are written on purpose in one test
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, data in items:
                archive.writestr(name, data)
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def pt2_root(members: dict[str, bytes]) -> str:
    return next(name.split("/")[0] for name in members if name.endswith("/archive_format"))


def torch_save_bytes(obj: object, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def data_pkl(obj: object, **kwargs: object) -> bytes:
    members = read_zip(torch_save_bytes(obj, **kwargs))
    return next(data for name, data in members.items() if name.endswith("/data.pkl"))


def resolved_global(payload: bytes) -> tuple[str, str]:
    """The first global a real unpickler would look up, caught before anything is called."""

    class Found(Exception):
        pass

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            raise Found(module, name)

    with pytest.raises(Found) as found:
        Recorder(io.BytesIO(payload)).load()
    return found.value.args


def with_sample_inputs_pickle(pt2: Path, payload: bytes, out: Path) -> Path:
    """Copy of `pt2` whose sample_inputs/model.pt carries `payload` as its data.pkl."""
    members = read_zip(pt2)
    sample_name = f"{pt2_root(members)}/data/sample_inputs/model.pt"
    inner = read_zip(members[sample_name])
    inner = {name: payload if name.endswith("/data.pkl") else data for name, data in inner.items()}
    members[sample_name] = write_zip(inner.items())
    write_zip(members.items(), out)
    return out


def stack_global_via_memo(module: str, name: str, argument: str) -> bytes:
    """Protocol 4 pickle calling module.name(argument), with the global's strings fetched from the
    memo after decoy strings naming an allowed global were pushed and popped."""
    return b"".join(
        [
            pickle.PROTO + b"\x04",
            pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode(),
            pickle.MEMOIZE,
            pickle.POP,
            pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode(),
            pickle.MEMOIZE,
            pickle.POP,
            pickle.SHORT_BINUNICODE + b"\x05torch",
            pickle.SHORT_BINUNICODE + b"\x0cFloatStorage",
            pickle.POP,
            pickle.POP,
            pickle.BINGET + b"\x00",
            pickle.BINGET + b"\x01",
            pickle.STACK_GLOBAL,
            pickle.SHORT_BINUNICODE + bytes([len(argument)]) + argument.encode(),
            pickle.TUPLE1,
            pickle.REDUCE,
            pickle.STOP,
        ]
    )


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


def test_pt2_raw_weights_that_start_like_a_pickle_are_not_scanned(pt2_path: Path) -> None:
    members = read_zip(pt2_path)
    assert any("/data/weights/" in name and data.startswith(b"\x80\x02") for name, data in members.items())
    vet_pt2(pt2_path)


def test_onnx_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "upload.bin"
    path.write_bytes(onnx_model_bytes())
    assert detect_format(path, "model.onnx", None) == "onnx"
    assert detect_format(path, None, "onnx") == "onnx"


@pytest.mark.parametrize(
    "obj",
    [
        torch.randn(3),
        (torch.randn(2, 2).t(), torch.arange(3)),
        {"mask": torch.ones(2, dtype=torch.bool), "ids": torch.zeros(2, dtype=torch.int32)},
        [torch.zeros(2, dtype=d) for d in (torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8)],
        [torch.zeros(2, dtype=dtype) for dtype in (torch.float8_e4m3fn, torch.uint16, torch.complex64)],
        torch.nn.Parameter(torch.randn(2)),
        torch.nn.Linear(2, 2).state_dict(),
        OrderedDict(shape=torch.Size([2, 3]), device=torch.device("cpu"), dtype=torch.float32, layout=torch.strided),
        {"set": {1, 2}, "frozen": frozenset({3}), "slice": slice(1, 2), "complex": 1 + 2j},
    ],
    ids=["tensor", "tuple", "dict", "dtypes", "new-dtypes", "parameter", "state-dict", "metadata", "builtins"],
)
@pytest.mark.parametrize("protocol", [2, 4])
def test_torch_save_tensor_pickles_pass_the_scan(obj: object, protocol: int) -> None:
    scan_pickle(data_pkl(obj, pickle_protocol=protocol), "data.pkl")


def test_tensor_with_attributes_passes_the_scan() -> None:
    tensor = torch.randn(2)
    tensor.note = "calibrated"
    scan_pickle(data_pkl(tensor), "data.pkl")


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


# --- payloads planted in a real pt2 -----------------------------------------------------


@pytest.mark.parametrize(
    ("make_payload", "expected_global"),
    [
        (lambda marker: pickle.dumps(SystemCall(f"touch {marker}"), protocol=2), "posix.system"),
        (lambda marker: pickle.dumps(ExecCall(f"open({str(marker)!r}, 'w')"), protocol=2), "__builtin__.exec"),
        (lambda marker: pickle.dumps(SystemCall(f"touch {marker}"), protocol=4), "posix.system"),
        (lambda marker: stack_global_via_memo("posix", "system", f"touch {marker}"), "posix.system"),
    ],
    ids=["reduce-system", "reduce-exec", "stack-global", "memo-indirection"],
)
def test_planted_sample_inputs_payload_is_refused(
    pt2_path: Path,
    tmp_path: Path,
    marker: Path,
    make_payload: Callable[[Path], bytes],
    expected_global: str,
) -> None:
    payload = make_payload(marker)
    assert ".".join(resolved_global(payload)) == expected_global  # the payload is real
    path = with_sample_inputs_pickle(pt2_path, payload, tmp_path / "evil.pt2")
    root = pt2_root(read_zip(path))

    with pytest.raises(UnsafeModelFile) as refused:
        vet_pt2(path)
    assert refused.value.code == "unsafe_pickle"
    assert refused.value.message == (
        f"pickle member '{root}/data/sample_inputs/model.pt:archive/data.pkl' "
        f"references '{expected_global}', which is not allowed"
    )
    with pytest.raises(UnsafeModelFile):
        detect_format(path, "evil.pt2", "pt2")


def test_pickle_hidden_behind_raw_weight_config_is_refused(pt2_path: Path, tmp_path: Path, marker: Path) -> None:
    """torch.export.load unpickles any weight the config marks use_pickle, whatever its name."""
    members = read_zip(pt2_path)
    root = pt2_root(members)
    config_name = f"{root}/data/weights/model_weights_config.json"
    config = json.loads(members[config_name])
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True
    members[config_name] = json.dumps(config).encode()
    members[f"{root}/data/weights/{entry['path_name']}"] = pickle.dumps(SystemCall(f"touch {marker}"), protocol=0)
    path = tmp_path / "evil.pt2"
    write_zip(members.items(), path)
    with pytest.raises(UnsafeModelFile, match=r"references 'posix\.system'"):
        vet_pt2(path)


def test_opaque_constant_is_scanned_even_when_marked_raw(pt2_path: Path, tmp_path: Path, marker: Path) -> None:
    """Constants named opaque_obj_* go through pickle.loads regardless of use_pickle."""
    members = read_zip(pt2_path)
    root = pt2_root(members)
    config_name = f"{root}/data/constants/model_constants_config.json"
    members[config_name] = json.dumps(
        {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False}}}
    ).encode()
    members[f"{root}/data/constants/opaque_obj_0"] = pickle.dumps(SystemCall(f"touch {marker}"), protocol=0)
    path = tmp_path / "evil.pt2"
    write_zip(members.items(), path)
    with pytest.raises(UnsafeModelFile, match=r"references 'posix\.system'"):
        vet_pt2(path)


def test_member_names_are_matched_case_insensitively(pt2_path: Path, tmp_path: Path, marker: Path) -> None:
    """torch's zip reader finds data/sample_inputs/model.pt under the name MODEL.PT too."""
    members = read_zip(pt2_path)
    root = pt2_root(members)
    del members[f"{root}/data/sample_inputs/model.pt"]
    members[f"{root}/data/sample_inputs/MODEL.PT"] = pickle.dumps(SystemCall(f"touch {marker}"), protocol=0)
    path = tmp_path / "evil.pt2"
    write_zip(members.items(), path)
    with pytest.raises(UnsafeModelFile, match=r"MODEL\.PT' references 'posix\.system'"):
        vet_pt2(path)


@pytest.mark.parametrize(
    "rename",
    [
        lambda root: f"{root}/../evil.pkl",
        lambda root: "/etc/evil.pkl",
        lambda root: f"{root}/DATA/sample_inputs/model.pt",  # a second copy, differing only in case
    ],
    ids=["dotdot", "absolute", "duplicate"],
)
def test_unsafe_member_names_are_refused(pt2_path: Path, tmp_path: Path, rename: Callable[[str], str]) -> None:
    members = read_zip(pt2_path)
    root = pt2_root(members)
    items = [*members.items(), (rename(root), members[f"{root}/data/sample_inputs/model.pt"])]
    path = tmp_path / "evil.pt2"
    write_zip(items, path)
    with pytest.raises(UnsupportedModelFile) as refused:
        vet_pt2(path)
    assert refused.value.code == "corrupt_archive"


def test_glued_zips_are_refused(pt2_path: Path, tmp_path: Path) -> None:
    """zipfile reads the last of two glued torch.save files, torch's own reader the first."""
    glued = torch_save_bytes(torch.tensor([666, 666, 666])) + torch_save_bytes(torch.tensor([1, 2, 3]))
    assert torch.load(io.BytesIO(glued)).tolist() == [666, 666, 666]
    assert read_zip(glued)["archive/data/0"][:8] == (1).to_bytes(8, "little")

    members = read_zip(pt2_path)
    members[f"{pt2_root(members)}/data/sample_inputs/model.pt"] = glued
    path = tmp_path / "glued.pt2"
    write_zip(members.items(), path)
    with pytest.raises(UnsupportedModelFile) as refused:
        vet_pt2(path)
    assert refused.value.code == "corrupt_archive"

    path.write_bytes(pt2_path.read_bytes() * 2)
    with pytest.raises(UnsupportedModelFile) as refused:
        detect_format(path, "glued.pt2", None)
    assert refused.value.code == "corrupt_archive"


def test_config_path_outside_its_folder_is_refused(pt2_path: Path, tmp_path: Path) -> None:
    members = read_zip(pt2_path)
    root = pt2_root(members)
    config_name = f"{root}/data/weights/model_weights_config.json"
    config = json.loads(members[config_name])
    next(iter(config["config"].values()))["path_name"] = "../sample_inputs/model.pt"
    members[config_name] = json.dumps(config).encode()
    path = tmp_path / "evil.pt2"
    write_zip(members.items(), path)
    with pytest.raises(UnsupportedModelFile) as refused:
        vet_pt2(path)
    assert refused.value.code == "corrupt_archive"


def test_oversized_pickle_member_is_refused(
    pt2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = read_zip(pt2_path)
    sample_name = f"{pt2_root(members)}/data/sample_inputs/model.pt"
    members[sample_name] = pickle.dumps(list(range(5000)), protocol=2)
    path = tmp_path / "big.pt2"
    write_zip(members.items(), path)
    vet_pt2(path)
    monkeypatch.setattr("app.core.vetting.modelfiles.MAX_PICKLE_BYTES", 4096)
    with pytest.raises(UnsafeModelFile, match=f"member '{sample_name}' is .* cannot be vetted"):
        vet_pt2(path)


# --- scan_pickle ------------------------------------------------------------------------


def test_stack_global_on_unresolvable_operands_is_refused() -> None:
    payload = b"".join(
        [
            pickle.PROTO + b"\x04",
            pickle.SHORT_BINBYTES + b"\x05posix",
            pickle.SHORT_BINBYTES + b"\x06system",
            pickle.STACK_GLOBAL,
            pickle.STOP,
        ]
    )
    with pytest.raises(UnsafeModelFile, match="STACK_GLOBAL on values that are not plain strings"):
        scan_pickle(payload, "x.pkl")


def test_every_pickle_in_a_stream_is_scanned(marker: Path) -> None:
    payload = pickle.dumps(1, protocol=2) + pickle.dumps(SystemCall(f"touch {marker}"), protocol=2)
    with pytest.raises(UnsafeModelFile, match=r"references 'posix\.system'"):
        scan_pickle(payload, "legacy.pt")


@pytest.mark.parametrize(
    "payload",
    [b"\x80\x02K\x01", b"\x80\x02\xff.", pickle.dumps(1) + b"trailing junk"],
    ids=["truncated", "unknown-opcode", "trailing-junk"],
)
def test_malformed_pickles_are_refused(payload: bytes) -> None:
    with pytest.raises(UnsafeModelFile, match="malformed"):
        scan_pickle(payload, "x.pkl")


@pytest.mark.parametrize(
    "target",
    [
        "builtins.eval",
        "builtins.getattr",
        "subprocess.Popen",
        "torch.nn.modules.linear.Linear",
        "__main__.Model",
        "copyreg._reconstructor",
    ],
)
def test_dangerous_globals_are_refused(target: str) -> None:
    module, name = target.rsplit(".", 1)
    payload = pickle.PROTO + b"\x02" + pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.STOP
    with pytest.raises(UnsafeModelFile, match=f"references '{target}'"):
        scan_pickle(payload, "x.pkl")


def test_inst_opcode_is_checked(marker: Path) -> None:
    payload = b"(" + pickle.STRING + f"'touch {marker}'\n".encode() + pickle.INST + b"posix\nsystem\n" + pickle.STOP
    assert resolved_global(payload) == ("posix", "system")
    with pytest.raises(UnsafeModelFile, match=r"references 'posix\.system'"):
        scan_pickle(payload, "x.pkl")


def test_extension_opcodes_are_refused() -> None:
    with pytest.raises(UnsafeModelFile, match="EXT1"):
        scan_pickle(pickle.PROTO + b"\x02" + pickle.EXT1 + b"\x01" + pickle.STOP, "x.pkl")


def test_allowlist_names_real_torch_objects() -> None:
    for module, name in ALLOWED_GLOBALS:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def test_python2_name_mapping_cannot_widen_the_allowlist() -> None:
    """Protocol < 3 unpicklers rename some globals; each allowed name must map to an allowed one."""
    for module, name in ALLOWED_GLOBALS:
        mapped = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        )
        assert mapped in ALLOWED_GLOBALS, (module, name, mapped)


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


def test_import_does_not_load_ml_libraries() -> None:
    script = (
        "import sys, app.core.vetting.modelfiles\n"
        "loaded = {'torch', 'numpy', 'onnx', 'onnxruntime', 'transformers'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=True)
