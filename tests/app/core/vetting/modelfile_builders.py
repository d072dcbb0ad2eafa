"""Builders shared by the model-file vetting tests, and by the API and worker tests that plant a payload in a
pt2: a tiny model to export, pickles that would run code, and zip helpers. The fixtures built on them are in
conftest.py."""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch


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
