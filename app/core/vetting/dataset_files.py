"""Dataset files: format detection and validation in the API process.

The format is decided from the content (the filename only words messages). Array files are validated from
their headers (npy headers inside an .npz, the JSON header of a .safetensors), so the API never loads a whole
array into memory and never unpickles anything. JSON Lines files are streamed line by line.
"""

import json
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from app.core.errors import ErrorCode, ServiceError

LABELS = "labels"

MAX_ARRAYS = 64
MAX_ZIP_DIRECTORY_BYTES = 1024 * 1024  # read before zipfile parses the directory, so a huge one stays cheap
MAX_NPY_HEADER_BYTES = 10_000
MAX_SAFETENSORS_HEADER_BYTES = 1024 * 1024
MAX_LINE_BYTES = 1024 * 1024
MAX_LABEL = 2**31 - 1
MAX_LABEL_COUNTS = 1000  # per-label counts are kept in `info` up to this many distinct labels

SUPPORTED_HINT = ("supported formats: npz (numpy.savez of named arrays), safetensors (named tensors), "
                  "jsonl (one {\"text\": ..., \"label\": ...} object per line)")

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or the end record of an empty zip
_ZIP_END_MAGIC = b"PK\x05\x06"
_ZIP_END_RECORD = struct.Struct("<4sHHHHIIH")  # signature, disks, entries, entries, cd size, cd offset, comment
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, RuntimeError,
               NotImplementedError, zlib.error)
UTF8_BOM = b"\xef\xbb\xbf"

# safetensors dtype -> numpy dtype; BF16 and the F8 types have no numpy dtype, so workers could not load them.
SAFETENSORS_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
                      "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
                      "F32": "float32", "F64": "float64"}


class DatasetError(ServiceError):
    """A file the service refuses: `unsupported_format` (not a dataset format) or a validation code."""


def _invalid(message: str) -> DatasetError:
    return DatasetError(ErrorCode.INVALID_DATASET, message)


@dataclass
class DatasetFacts:
    format: str
    num_samples: int
    has_labels: bool
    info: dict[str, Any] = field(default_factory=dict)


def inspect_dataset(path: Path, filename: str) -> DatasetFacts:
    """Detect the format from the content and validate the file; raises DatasetError."""
    size = path.stat().st_size
    if size == 0:
        raise DatasetError(ErrorCode.EMPTY_FILE, f"{filename!r} is empty")
    with open(path, "rb") as file:
        head = file.read(9)
        if head.startswith(_ZIP_MAGICS):
            return _inspect_npz(file, size, filename)
        if _looks_like_safetensors(head, size):
            return _inspect_safetensors(file, size)
        file.seek(0)
        if file.read(len(UTF8_BOM)) != UTF8_BOM:
            file.seek(0)
        if file.read(MAX_LINE_BYTES).lstrip(b" \t\r\n")[:1] == b"{":
            file.seek(0)
            return _inspect_jsonl(file)
    raise DatasetError(ErrorCode.UNSUPPORTED_FORMAT,
                       f"{filename!r} is not a dataset this service reads; {SUPPORTED_HINT}")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """An 8-byte little-endian header length, then `{`.

    Real header lengths are far below 2**40, so the length's top three bytes are zero: text never has NULs,
    which keeps jsonl apart. Such a length that runs past the end of the file is a truncated safetensors file.
    """
    if len(head) < 9 or head[8:9] != b"{" or head[5:8] != b"\0\0\0":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    if 8 + header_len > size:
        raise _invalid(f"safetensors header length {header_len} runs past the end of the file ({size} bytes)")
    return True


def _check_arrays(arrays: dict[str, tuple[tuple[int, ...], np.dtype]], fmt: str) -> DatasetFacts:
    """Rules shared by npz and safetensors: numeric dtypes, one sample count, 1-D integer labels."""
    if not arrays:
        raise _invalid("the file holds no arrays")
    reference = None
    for name, (shape, dtype) in arrays.items():
        if dtype.hasobject or dtype.kind not in "biuf":
            raise _invalid(f"array {name!r} has dtype {dtype}, which is not allowed; arrays must be bool, "
                           "integer or floating point")
        if not shape:
            raise _invalid(f"array {name!r} is a scalar; every array needs a first (sample) dimension")
        if shape[0] == 0:
            raise _invalid(f"array {name!r} has no samples (shape {tuple(shape)})")
        if 0 in shape:
            raise _invalid(f"array {name!r} has an empty dimension (shape {tuple(shape)})")
        if reference is None:
            reference = name
        elif shape[0] != arrays[reference][0][0]:
            raise _invalid(f"array {name!r} has {shape[0]} samples but {reference!r} has "
                           f"{arrays[reference][0][0]}")
    if LABELS in arrays:
        shape, dtype = arrays[LABELS]
        if len(shape) != 1:
            raise _invalid(f"array {LABELS!r} must be 1-D (one class id per sample), got shape {tuple(shape)}")
        if dtype.kind not in "iu":
            raise _invalid(f"array {LABELS!r} must hold integer class ids, got dtype {dtype}")
        if len(arrays) == 1:
            raise _invalid(f"the file holds only {LABELS!r}; it needs at least one input array")
    info = {"arrays": {name: {"shape": list(shape), "dtype": str(dtype)} for name, (shape, dtype) in arrays.items()}}
    return DatasetFacts(format=fmt, num_samples=arrays[reference][0][0], has_labels=LABELS in arrays, info=info)


def _inspect_npz(file: IO[bytes], size: int, filename: str) -> DatasetFacts:
    _check_zip_directory(file, size)
    try:
        with zipfile.ZipFile(file) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_ARRAYS:
                raise _invalid(f"the .npz archive has {len(infos)} members; at most {MAX_ARRAYS} arrays are allowed")
            others = [info.filename for info in infos if not info.filename.endswith(".npy")]
            if others:
                raise DatasetError(ErrorCode.UNSUPPORTED_FORMAT,
                                   f"{filename!r} is a zip archive but not an .npz: member "
                                   f"{others[0]!r} is not a .npy array; {SUPPORTED_HINT}")
            arrays: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
            for info in infos:
                name = info.filename.removesuffix(".npy")
                if name in arrays:
                    raise _invalid(f"the .npz archive holds array {name!r} twice")
                arrays[name] = _read_npy_header(archive, info, name)
    except _ZIP_ERRORS as exc:
        raise DatasetError(ErrorCode.UNSUPPORTED_FORMAT, f"{filename!r} is not a readable zip/.npz archive "
                                                         f"({exc.__class__.__name__}); {SUPPORTED_HINT}") from None
    return _check_arrays(arrays, "npz")


def _check_zip_directory(file: IO[bytes], size: int) -> None:
    """Refuse a central directory too big for MAX_ARRAYS members before zipfile reads all of it."""
    tail_len = min(size, _ZIP_END_RECORD.size + 0xFFFF)  # the end record, then at most a 64 KiB comment
    file.seek(size - tail_len)
    tail = file.read(tail_len)
    at = tail.rfind(_ZIP_END_MAGIC)
    if at < 0 or at + _ZIP_END_RECORD.size > len(tail):
        return  # not a well-formed zip: zipfile reports it
    directory_bytes = _ZIP_END_RECORD.unpack_from(tail, at)[5]
    if directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise _invalid(f"the .npz archive's directory is {directory_bytes} bytes; at most {MAX_ARRAYS} arrays "
                       "are allowed")


def _read_npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the member's .npy header; the data size must match, so truncation is caught."""
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member, max_header_size=MAX_NPY_HEADER_BYTES)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member, max_header_size=MAX_NPY_HEADER_BYTES)
            else:
                raise _invalid(f"array {name!r} uses .npy format version {version[0]}.{version[1]}; "
                               "versions 1.0 and 2.0 are supported")
        except ValueError as exc:
            raise _invalid(f"array {name!r} does not have a valid .npy header: {exc}") from None
        header_end = member.tell()
    if not dtype.hasobject and info.file_size != header_end + math.prod(shape) * dtype.itemsize:
        raise _invalid(f"array {name!r} holds {info.file_size - header_end} data bytes, but its header "
                       f"describes {math.prod(shape) * dtype.itemsize} (shape {tuple(shape)}, dtype {dtype})")
    return tuple(shape), dtype


def _inspect_safetensors(file: IO[bytes], size: int) -> DatasetFacts:
    file.seek(0)
    (header_len,) = struct.unpack("<Q", file.read(8))
    if header_len > MAX_SAFETENSORS_HEADER_BYTES:
        raise _invalid(f"safetensors header is {header_len} bytes; at most {MAX_SAFETENSORS_HEADER_BYTES} "
                       "are allowed")
    try:
        header = json.loads(file.read(header_len))
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _invalid("safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > MAX_ARRAYS:
        raise _invalid(f"the file has {len(header)} tensors; at most {MAX_ARRAYS} arrays are allowed")
    data_bytes = size - 8 - header_len
    arrays: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for name, entry in header.items():
        arrays[name] = _safetensors_entry(name, entry, data_bytes)
    return _check_arrays(arrays, "safetensors")


def _safetensors_entry(name: str, entry: Any, data_bytes: int) -> tuple[tuple[int, ...], np.dtype]:
    if not isinstance(entry, dict):
        raise _invalid(f"tensor {name!r}: header entry is not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype_name not in SAFETENSORS_DTYPES:
        raise _invalid(f"tensor {name!r} has dtype {dtype_name}, which is not allowed; supported: "
                       f"{', '.join(SAFETENSORS_DTYPES)} (BF16 and F8 have no numpy equivalent: store F32 or F16)")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _invalid(f"tensor {name!r}: 'shape' must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise _invalid(f"tensor {name!r}: 'data_offsets' must be [begin, end] within the {data_bytes} data bytes")
    dtype = np.dtype(SAFETENSORS_DTYPES[dtype_name])
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        raise _invalid(f"tensor {name!r} has {offsets[1] - offsets[0]} data bytes, but shape {tuple(shape)} of "
                       f"{dtype_name} needs {math.prod(shape) * dtype.itemsize}")
    return tuple(shape), dtype


def _inspect_jsonl(file: IO[bytes]) -> DatasetFacts:
    """Every non-empty line is {"text": non-empty str, "label": optional int}; labels on all lines or none."""
    if file.read(len(UTF8_BOM)) != UTF8_BOM:
        file.seek(0)
    samples = 0
    first_labelled: bool | None = None
    label_counts: dict[int, int] = {}
    line_number = 0
    while line := file.readline(MAX_LINE_BYTES + 1):
        line_number += 1
        if len(line) > MAX_LINE_BYTES:
            raise _invalid(f"line {line_number} is longer than {MAX_LINE_BYTES} bytes")
        if not line.strip():
            continue
        record = _parse_line(line, line_number)
        labelled = "label" in record
        if first_labelled is None:
            first_labelled = labelled
        elif labelled != first_labelled:
            raise _invalid(f"line {line_number} {'has' if labelled else 'has no'} 'label' but earlier lines "
                           f"{'do not' if labelled else 'do'}; either every line has a label or none does")
        if labelled:
            label_counts[record["label"]] = label_counts.get(record["label"], 0) + 1
        samples += 1
    info: dict[str, Any] = {}
    if first_labelled:
        info["num_labels"] = len(label_counts)
        if len(label_counts) <= MAX_LABEL_COUNTS:
            info["label_counts"] = {str(label): count for label, count in sorted(label_counts.items())}
    return DatasetFacts(format="jsonl", num_samples=samples, has_labels=bool(first_labelled), info=info)


def _parse_line(line: bytes, line_number: int) -> dict[str, Any]:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise _invalid(f"line {line_number}: not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"line {line_number}: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise _invalid(f"line {line_number}: expected a JSON object, got {type(record).__name__}")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise _invalid(f"line {line_number}: 'text' must be a non-empty string")
    if "label" in record:
        label = record["label"]
        if type(label) is not int or not 0 <= label <= MAX_LABEL:
            raise _invalid(f"line {line_number}: 'label' must be an integer class id between 0 and {MAX_LABEL}")
    return record
