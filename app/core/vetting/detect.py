"""Format detection for uploaded model files: which supported format (pt2, onnx, hf) an upload is, judged by
content, then vetted by that format's module.

The API process imports this module, so it is pure stdlib: it must never import torch, onnx or numpy, and it
never unpickles or otherwise runs uploaded content. Everything is decided from the bytes of the file; the
client's filename is only used to word error messages.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath
from typing import IO

from app.core.errors import ErrorCode
from app.core.vetting import archives
from app.core.vetting.hf import vet_hf
from app.core.vetting.pickles import parses_as_pickle, starts_with_proto
from app.core.vetting.pt2 import is_pt2, vet_pt2
from app.core.vetting.refusals import UnsupportedModelFile
from app.core.vetting.zips import ARCHIVE_ERRORS, ZIP_END_MAGIC, ZIP_MAGIC, check_directory, check_layout

SUPPORTED_FORMATS = ("pt2", "onnx", "hf")

_HEAD_BYTES = 1024 * 1024

_SUPPORTED_HINT = (
    "supported formats: pt2 (written by torch.export.save), onnx, and hf (a zip or tar.gz of a Hugging Face "
    "model directory with config.json and *.safetensors weights)"
)
_DESCRIPTIONS = {"pt2": "a pt2 archive", "onnx": "an ONNX model", "hf": "a Hugging Face model archive"}

# ModelProto field number -> protobuf wire type (0 varint, 2 length-delimited).
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_ONNX_GRAPH_FIELD = 7
_ONNX_MAX_IR_VERSION = 20
_ONNX_MAX_HEADER_FIELDS = 64


def detect_format(
    path: Path,
    filename: str | None,
    declared: str | None,
    *,
    max_unpacked_bytes: int = archives.DEFAULT_MAX_TOTAL_BYTES,
) -> str:
    """Return the format of the upload at `path`, judged by content, after vetting it.

    `max_unpacked_bytes` caps what a Hugging Face archive may expand to (UNPACK_FACTOR x the upload limit).
    """
    if declared is not None and declared not in SUPPORTED_FORMATS:
        raise UnsupportedModelFile(
            ErrorCode.UNSUPPORTED_FORMAT, f"declared format {declared!r} is not supported; {_SUPPORTED_HINT}"
        )
    subject = repr(filename) if filename else "the file"
    detected = _sniff(path, subject)
    if declared is not None and declared != detected:
        raise UnsupportedModelFile(
            ErrorCode.FORMAT_MISMATCH, f"declared format {declared} but the file is {_DESCRIPTIONS[detected]}"
        )
    if detected == "pt2":
        vet_pt2(path)
    elif detected == "hf":
        vet_hf(path, subject, max_unpacked_bytes=max_unpacked_bytes)
    return detected


def stored_extension(path: Path, fmt: str) -> str:
    """The extension an upload is stored under: a Hugging Face archive keeps its own kind (zip, tar.gz, tar),
    which detect_format has already established."""
    return (archives.archive_kind(path) or fmt) if fmt == "hf" else fmt


def _sniff(path: Path, subject: str) -> str:
    size = path.stat().st_size
    if size == 0:
        raise UnsupportedModelFile(ErrorCode.EMPTY_FILE, f"{subject} is empty")
    with path.open("rb") as file:
        head = file.read(_HEAD_BYTES)
        if head.startswith((ZIP_MAGIC, ZIP_END_MAGIC)):
            return _sniff_zip(path, subject)
        if starts_with_proto(head):
            raise _pickled_model(subject)
        if _looks_like_onnx(file, size):
            return "onnx"
    if archives.archive_kind(path) in (archives.TAR, archives.TAR_GZ):
        return "hf"  # the only tar we accept; vet_hf says what is missing from any other
    if parses_as_pickle(head):
        raise _pickled_model(subject)
    raise UnsupportedModelFile(
        ErrorCode.UNSUPPORTED_FORMAT, f"{subject} is not a recognised model file; {_SUPPORTED_HINT}"
    )


def _sniff_zip(path: Path, subject: str) -> str:
    try:
        with path.open("rb") as file:
            check_directory(file, subject)
        with path.open("rb") as file, zipfile.ZipFile(file) as archive:
            check_layout(file, archive)
            infos = archive.infolist()
            if is_pt2(archive, infos):
                return "pt2"
            basenames = {PurePosixPath(info.filename.lower()).name for info in infos}
    except ARCHIVE_ERRORS as exc:
        raise UnsupportedModelFile(
            ErrorCode.CORRUPT_ARCHIVE, f"{subject} is a corrupt or truncated zip archive ({exc})"
        ) from exc
    if "data.pkl" in basenames:
        raise _pickled_model(subject)
    if "config.json" in basenames:
        return "hf"
    raise UnsupportedModelFile(
        ErrorCode.UNSUPPORTED_FORMAT,
        f"{subject} is a zip archive but neither a pt2 archive nor a Hugging Face model directory; {_SUPPORTED_HINT}",
    )


def _pickled_model(subject: str) -> UnsupportedModelFile:
    return UnsupportedModelFile(
        ErrorCode.PICKLED_MODEL,
        f"{subject} is a pickled PyTorch object (torch.save); pickled objects are not accepted "
        "because loading them runs code. Export the model with torch.export.save (.pt2) or to "
        f"ONNX instead; {_SUPPORTED_HINT}",
    )


def _looks_like_onnx(file: IO[bytes], size: int) -> bool:
    """Walk ModelProto's top-level fields up to the graph without decoding any payload.

    onnx writes ir_version (field 1, tag 0x08) first; after it we accept only known
    field numbers with the right wire type and lengths that fit in the file.
    """
    file.seek(0)
    if file.read(1) != b"\x08":
        return False
    ir_version = _read_varint(file)
    if ir_version is None or not 1 <= ir_version <= _ONNX_MAX_IR_VERSION:
        return False
    for _ in range(_ONNX_MAX_HEADER_FIELDS):
        key = _read_varint(file)
        if key is None:
            return False
        field, wire_type = key >> 3, key & 7
        if _ONNX_FIELDS.get(field) != wire_type:
            return False
        value = _read_varint(file)
        if value is None:
            return False
        if wire_type == 2:
            end = file.tell() + value
            if end > size:
                return False
            if field == _ONNX_GRAPH_FIELD:
                return True
            file.seek(end)
    return False


def _read_varint(file: IO[bytes]) -> int | None:
    """Read a protobuf base-128 varint; None when truncated or longer than 10 bytes."""
    value = 0
    for shift in range(0, 70, 7):
        byte = file.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    return None
