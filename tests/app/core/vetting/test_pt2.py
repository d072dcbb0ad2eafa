"""Tests for app.core.vetting.pt2: payloads planted in a real pt2 archive are found and refused without being
unpickled."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.core.vetting.detect import detect_format
from app.core.vetting.pt2 import vet_pt2
from app.core.vetting.refusals import UnsafeModelFile, UnsupportedModelFile
from tests.app.core.vetting.modelfile_builders import (
    SystemCall,
    pt2_root,
    read_zip,
    resolved_global,
    torch_save_bytes,
    with_sample_inputs_pickle,
    write_zip,
)


class ExecCall:
    """Unpickling this runs exec(code)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (self.code,))


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


def test_pt2_raw_weights_that_start_like_a_pickle_are_not_scanned(pt2_path: Path) -> None:
    members = read_zip(pt2_path)
    assert any("/data/weights/" in name and data.startswith(b"\x80\x02") for name, data in members.items())
    vet_pt2(pt2_path)


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
    monkeypatch.setattr("app.core.vetting.pt2.MAX_PICKLE_BYTES", 4096)
    with pytest.raises(UnsafeModelFile, match=f"member '{sample_name}' is .* cannot be vetted"):
        vet_pt2(path)
