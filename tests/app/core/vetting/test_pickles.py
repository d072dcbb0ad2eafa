"""Tests for app.core.vetting.pickles: the opcode vetter passes what torch.save writes for tensors and refuses
every global outside its allowlist, without executing anything."""

from __future__ import annotations

import _compat_pickle
import importlib
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from app.core.vetting.pickles import ALLOWED_GLOBALS, scan_pickle
from app.core.vetting.refusals import UnsafeModelFile
from tests.app.core.vetting.modelfile_builders import SystemCall, read_zip, resolved_global, torch_save_bytes


def data_pkl(obj: object, **kwargs: object) -> bytes:
    members = read_zip(torch_save_bytes(obj, **kwargs))
    return next(data for name, data in members.items() if name.endswith("/data.pkl"))


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
