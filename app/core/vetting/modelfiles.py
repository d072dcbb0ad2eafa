"""Format detection and pickle vetting for uploaded model files.

The API process imports this module, so it is pure stdlib: it must never import
torch, onnx or numpy, and it never unpickles or otherwise runs uploaded content.
Everything is decided from the bytes of the file; the client's filename is only
used to word error messages.
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from app.core.errors import ErrorCode, ServiceError
from app.core.vetting import archives

SUPPORTED_FORMATS = ("pt2", "onnx", "hf")

# Pickles inside a pt2 (sample inputs, the odd pickled constant) are small; anything
# bigger is refused rather than read into the API process.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# Total bytes inflated while vetting one archive, so a zip bomb stays cheap.
MAX_SCAN_BYTES = 256 * 1024 * 1024

# config.json and tokenizer_config.json are read whole at upload; real ones are a few kilobytes.
MAX_CONFIG_BYTES = 1024 * 1024
# A Hugging Face archive may unpack to this many times the upload limit (safetensors hardly compress). The API
# checks the declared sizes against it at upload, the worker the bytes it really writes.
UNPACK_FACTOR = 4

_HEAD_BYTES = 1024 * 1024
_PICKLE_PROTO = 0x80
_HIGHEST_PICKLE_PROTOCOL = 5

_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_END_MAGIC = b"PK\x05\x06"  # also how an empty zip starts
_ZIP_END_RECORD = struct.Struct("<4s4xHHIIH")  # signature, entries, entries, cd size, cd offset, comment length
_ZIP64_LOCATOR_MAGIC = b"PK\x06\x07"
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # signature, disk, zip64 end record offset, disks
_ZIP64_END_MAGIC = b"PK\x06\x06"
_ZIP64_END_RECORD = struct.Struct("<4sQHHIIQQQQ")  # signature, ..., cd size, cd offset
_ZIP32_SATURATED = 0xFFFFFFFF
_ZIP_UTF8_FLAG = 0x800

_SUPPORTED_HINT = (
    "supported formats: pt2 (written by torch.export.save), onnx, and hf (a zip or tar.gz of a Hugging Face "
    "model directory with config.json and *.safetensors weights)"
)
_DESCRIPTIONS = {"pt2": "a pt2 archive", "onnx": "an ONNX model", "hf": "a Hugging Face model archive"}
# Weights a Hugging Face directory may hold; the worker loads a pytorch_model.bin only if it is a plain
# state dict (torch.load with weights_only=True).
_SAFETENSORS_SUFFIX = ".safetensors"
_PICKLED_WEIGHTS = "pytorch_model.bin"

# Errors the zipfile module raises on damaged or hostile archives.
_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    ValueError,
    OverflowError,
    NotImplementedError,
    RuntimeError,
    zlib.error,
)

# torch's zip reader matches member names case-insensitively, so all name checks
# below work on lowercased names.
_PICKLE_SUFFIXES = (b".pkl", b".pt", b".pth")
# Payload files torch reads as raw bytes when the config says use_pickle=false;
# constants named custom_obj_*/opaque_obj_* are unpickled whatever the flag says.
_RAW_PAYLOAD_PREFIXES = ("weight_", "tensor_")
_PAYLOAD_DIRS = (b"weights", b"constants")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

# ModelProto field number -> protobuf wire type (0 varint, 2 length-delimited).
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_ONNX_GRAPH_FIELD = 7
_ONNX_MAX_IR_VERSION = 20
_ONNX_MAX_HEADER_FIELDS = 64

_STORAGE_TYPES = (
    "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
    "ComplexFloat", "ComplexDouble",
)  # fmt: skip
_DTYPES = (
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
)  # fmt: skip
# What torch.save needs for tensors, parameters and plain containers, and nothing
# that can reach code: no module classes, no getattr/eval, no numpy.
# "__builtin__" is the protocol-2 spelling that unpicklers map to "builtins".
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch", "Tensor"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch.serialization", "_get_layout"),
        ("torch.storage", "UntypedStorage"),
        *(("torch", f"{kind}Storage") for kind in _STORAGE_TYPES),
        *(("torch", dtype) for dtype in _DTYPES),
        *(
            (module, name)
            for module in ("builtins", "__builtin__")
            for name in ("set", "frozenset", "slice", "complex")
        ),
    }
)

_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)
_MEMO_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
# EXT* fetch callables from the copyreg extension registry: globals we cannot name.
_EXTENSION_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_MARK = object()  # a MARK on the simulated stack
_UNKNOWN = object()  # a value we do not track: only strings pushed as literals are


class UnsupportedModelFile(ServiceError):
    """An upload we refuse, with the catalogue's code for why."""


class UnsafeModelFile(UnsupportedModelFile):
    """Pickled content that could run code when loaded, or that we cannot vet."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNSAFE_PICKLE, message)


def detect_format(path: Path, filename: str | None, declared: str | None, *,
                  max_unpacked_bytes: int = archives.DEFAULT_MAX_TOTAL_BYTES) -> str:
    """Return the format of the upload at `path`, judged by content, after vetting it.

    `max_unpacked_bytes` caps what a Hugging Face archive may expand to (UNPACK_FACTOR x the upload limit).
    """
    if declared is not None and declared not in SUPPORTED_FORMATS:
        raise UnsupportedModelFile(ErrorCode.UNSUPPORTED_FORMAT, f"declared format {declared!r} is not supported; {_SUPPORTED_HINT}"
        )
    subject = repr(filename) if filename else "the file"
    detected = _sniff(path, subject)
    if declared is not None and declared != detected:
        raise UnsupportedModelFile(ErrorCode.FORMAT_MISMATCH, f"declared format {declared} but the file is {_DESCRIPTIONS[detected]}"
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


def vet_hf(path: Path, subject: str = "the archive", *,
           max_unpacked_bytes: int = archives.DEFAULT_MAX_TOTAL_BYTES) -> None:
    """Check a Hugging Face model archive without extracting it.

    The listing must pass the archive safety rules, config.json must sit at the model root and parse, weights
    must be there, and nothing may ask for custom code (auto_map, trust_remote_code): that code would run.
    """
    try:
        listing = archives.list_archive(path, max_total_bytes=max_unpacked_bytes)
    except archives.ArchiveError as exc:
        raise UnsupportedModelFile(exc.code, f"{subject}: {exc.message}") from None
    if "config.json" not in listing.files:
        raise UnsupportedModelFile(ErrorCode.MISSING_CONFIG, f"{subject} has no config.json at its top level (or in its single top-level folder); a Hugging "
            "Face model archive holds the model directory written by save_pretrained",
        )
    top_level = [name for name in listing.files if "/" not in name]
    if not any(name.endswith(_SAFETENSORS_SUFFIX) for name in top_level) and _PICKLED_WEIGHTS not in top_level:
        raise UnsupportedModelFile(ErrorCode.MISSING_WEIGHTS, f"{subject} has no weights next to config.json: expected model.safetensors (or sharded "
            "*.safetensors with model.safetensors.index.json)",
        )
    for name in ("config.json", "tokenizer_config.json"):
        if name in listing.files:
            reason = remote_code_reason(_read_json_member(path, listing, name, subject))
            if reason:
                raise UnsupportedModelFile(ErrorCode.REMOTE_CODE_REFUSED, f"{subject}: {name} {reason}, which means running code shipped with the model; that is "
                    "never done here. Upload a model whose architecture is built into transformers",
                )


def remote_code_reason(document: object) -> str | None:
    """Why a config would make transformers import code from the model directory, or None.

    Nested configs (text_config, ...) count too; walked with a list, not recursion, so depth cannot crash it.
    Shared with the worker, which checks the extracted files again before loading anything.
    """
    pending = [document]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if "auto_map" in item:
                return "sets auto_map (custom model classes)"
            if item.get("trust_remote_code") is True:
                return "sets trust_remote_code"
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def _read_json_member(path: Path, listing: archives.ArchiveListing, name: str, subject: str) -> dict[str, object]:
    try:
        data = archives.read_member(path, listing.member(name), max_bytes=MAX_CONFIG_BYTES)
    except archives.ArchiveError as exc:
        raise UnsupportedModelFile(exc.code, f"{subject}: {exc.message}") from None
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise UnsupportedModelFile(ErrorCode.INVALID_CONFIG, f"{subject}: {name} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise UnsupportedModelFile(ErrorCode.INVALID_CONFIG, f"{subject}: {name} is not a JSON object")
    return document


def vet_pt2(path: Path) -> None:
    """Scan every member torch.export.load may unpickle, without unpickling anything.

    Sample inputs fall back to torch.load(weights_only=False), and the weights and
    constants configs can mark any payload file as pickled, so those are scanned
    whatever their name or first bytes; other members are scanned when they are
    named or look like a pickle or a nested torch.save zip.
    """
    try:
        with path.open("rb") as file, zipfile.ZipFile(file) as archive:
            _check_layout(file, archive)
            infos = archive.infolist()
            _check_member_names(infos)
            budget = _ScanBudget()
            pickled, raw = _payload_members(archive, infos, budget)
            for info in infos:
                if not info.is_dir():
                    _vet_member(archive, info, pickled, raw, budget)
    except _ARCHIVE_ERRORS as exc:
        raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, f"the pt2 archive is corrupt ({exc})") from exc


def scan_pickle(data: bytes, where: str) -> None:
    """Refuse a pickle stream unless every global it references is allowlisted.

    Opcodes are walked with pickletools, never executed. A stream may hold several
    pickles back to back (legacy torch.save does), so all are scanned and bytes
    that do not parse are refused.
    """
    stream = io.BytesIO(data)
    try:
        while stream.tell() < len(data):
            _scan_one_pickle(stream, where)
    except ValueError as exc:
        raise UnsafeModelFile(f"pickle member {where!r} is malformed ({exc}); refusing it") from exc


def _sniff(path: Path, subject: str) -> str:
    size = path.stat().st_size
    if size == 0:
        raise UnsupportedModelFile(ErrorCode.EMPTY_FILE, f"{subject} is empty")
    with path.open("rb") as file:
        head = file.read(_HEAD_BYTES)
        if head.startswith((_ZIP_MAGIC, _ZIP_END_MAGIC)):
            return _sniff_zip(path, subject)
        if _starts_with_proto(head):
            raise _pickled_model(subject)
        if _looks_like_onnx(file, size):
            return "onnx"
    if archives.archive_kind(path) in (archives.TAR, archives.TAR_GZ):
        return "hf"  # the only tar we accept; vet_hf says what is missing from any other
    if _parses_as_pickle(head):
        raise _pickled_model(subject)
    raise UnsupportedModelFile(ErrorCode.UNSUPPORTED_FORMAT, f"{subject} is not a recognised model file; {_SUPPORTED_HINT}")


def _sniff_zip(path: Path, subject: str) -> str:
    try:
        with path.open("rb") as file, zipfile.ZipFile(file) as archive:
            _check_layout(file, archive)
            infos = archive.infolist()
            if _is_pt2(archive, infos):
                return "pt2"
            basenames = {PurePosixPath(info.filename.lower()).name for info in infos}
    except _ARCHIVE_ERRORS as exc:
        raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, f"{subject} is a corrupt or truncated zip archive ({exc})"
        ) from exc
    if "data.pkl" in basenames:
        raise _pickled_model(subject)
    if "config.json" in basenames:
        return "hf"
    raise UnsupportedModelFile(ErrorCode.UNSUPPORTED_FORMAT, f"{subject} is a zip archive but neither a pt2 archive nor a Hugging Face model directory; "
        f"{_SUPPORTED_HINT}",
    )


def _is_pt2(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> bool:
    """torch.export.save writes <root>/archive_format = "pt2"; torch <= 2.7 wrote root-level files."""
    for info in infos:
        parts = info.filename.lower().split("/")
        if parts == ["serialized_exported_program.json"]:
            return True
        if (
            len(parts) == 2
            and parts[1] == "archive_format"
            and info.file_size == len(b"pt2")
            and archive.read(info) == b"pt2"
        ):
            return True
    return False


def _pickled_model(subject: str) -> UnsupportedModelFile:
    return UnsupportedModelFile(ErrorCode.PICKLED_MODEL, f"{subject} is a pickled PyTorch object (torch.save); pickled objects are not accepted "
        "because loading them runs code. Export the model with torch.export.save (.pt2) or to "
        f"ONNX instead; {_SUPPORTED_HINT}",
    )


def _starts_with_proto(head: bytes) -> bool:
    """Protocol 2+ pickles (and legacy torch.save streams) open with the PROTO opcode."""
    return len(head) >= 2 and head[0] == _PICKLE_PROTO and head[1] <= _HIGHEST_PICKLE_PROTOCOL


def _parses_as_pickle(head: bytes) -> bool:
    """Protocol 0/1 pickles have no magic number, so try to parse the head up to STOP."""
    try:
        for _ in pickletools.genops(head):
            pass
    except ValueError:
        return False
    return True


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


@dataclass
class _ScanBudget:
    """Bytes we may still inflate while vetting one archive."""

    left: int = MAX_SCAN_BYTES


def _member_key(info: zipfile.ZipInfo) -> bytes:
    """The name as stored, ASCII-lowercased: that is how torch's C++ zip reader finds members."""
    encoding = "utf-8" if info.flag_bits & _ZIP_UTF8_FLAG else "cp437"
    return info.filename.encode(encoding).lower()


def _check_layout(file: IO[bytes], archive: zipfile.ZipFile) -> None:
    """Refuse zips whose central directory Python and torch could find in different places.

    Python's zipfile accepts data in front of an archive by shifting every offset;
    torch's C++ reader uses the offsets as written. Two torch.save files glued
    together thus read as the second file here and as the first one in torch.
    So the end record must close the file (no comment) and name, as written, the
    central directory this reader used.
    """
    size = file.seek(0, io.SEEK_END)
    if size < _ZIP_END_RECORD.size:
        raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, "the zip archive is truncated")
    file.seek(size - _ZIP_END_RECORD.size)
    magic, _, _, _, offset, comment_length = _ZIP_END_RECORD.unpack(file.read(_ZIP_END_RECORD.size))
    if magic != _ZIP_END_MAGIC or comment_length:
        raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, "the zip archive has data after its end record")
    locator_at = size - _ZIP_END_RECORD.size - _ZIP64_LOCATOR.size
    record_at = locator_at - _ZIP64_END_RECORD.size
    if record_at >= 0:
        file.seek(locator_at)
        locator_magic, _, pointer, _ = _ZIP64_LOCATOR.unpack(file.read(_ZIP64_LOCATOR.size))
        if locator_magic == _ZIP64_LOCATOR_MAGIC:
            file.seek(record_at)
            record = _ZIP64_END_RECORD.unpack(file.read(_ZIP64_END_RECORD.size))
            # Python reads the zip64 record right before the locator, torch where it points.
            if pointer != record_at or record[0] != _ZIP64_END_MAGIC:
                raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, "the zip archive has an inconsistent zip64 record")
            if offset not in (record[-1], _ZIP32_SATURATED):
                raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, "the zip archive has conflicting end records")
            offset = record[-1]
    if archive.start_dir != offset:
        raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, "the zip archive has data in front of it or is truncated")


def _check_member_names(infos: list[zipfile.ZipInfo]) -> None:
    """Refuse names that escape a directory or that different zip readers resolve differently."""
    seen: set[bytes] = set()
    for info in infos:
        as_windows = PureWindowsPath(info.filename)  # splits on "/" and "\" and knows drives
        if info.orig_filename != info.filename or as_windows.drive or as_windows.root or ".." in as_windows.parts:
            raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, f"archive member name {info.orig_filename!r} is not allowed"
            )
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, f"archive member {info.filename!r} uses an unsupported compression method"
            )
        key = _member_key(info)
        if key in seen:
            raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, f"archive member {info.filename!r} appears more than once")
        seen.add(key)


def _payload_members(
    archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], budget: _ScanBudget
) -> tuple[set[bytes], set[bytes]]:
    """Keys of members the payload configs have torch unpickle, and of those it reads as raw bytes."""
    keys = {_member_key(info) for info in infos}
    pickled: set[bytes] = set()
    raw: set[bytes] = set()
    for info in infos:
        key = _member_key(info)
        parts = key.split(b"/")
        if len(parts) < 3 or parts[-3] != b"data" or parts[-2] not in _PAYLOAD_DIRS:
            continue
        if not parts[-1].endswith(b"_config.json"):
            continue
        folder = key.rsplit(b"/", 1)[0]
        for path_name, use_pickle in _config_entries(archive, info, budget):
            target = folder + b"/" + path_name.lower().encode("ascii")
            if target not in keys:
                raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, f"{info.filename!r} refers to missing member {path_name!r}"
                )
            if use_pickle is False and path_name.startswith(_RAW_PAYLOAD_PREFIXES):
                raw.add(target)
            else:
                pickled.add(target)
    return pickled, raw


def _config_entries(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _ScanBudget
) -> Iterator[tuple[str, object]]:
    """(path_name, use_pickle) of each entry of a torch.export payload config."""
    document = json.loads(_read_capped(archive, info, info.filename, budget))
    config = document.get("config") if isinstance(document, dict) else None
    if not isinstance(config, dict):
        raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, f"{info.filename!r} is not a payload config")
    for entry in config.values():
        path_name = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(path_name, str) or not _PLAIN_NAME.fullmatch(path_name):
            raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, f"{info.filename!r} has an entry with an invalid path_name {path_name!r}"
            )
        yield path_name, entry.get("use_pickle")


def _vet_member(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    pickled: set[bytes],
    raw: set[bytes],
    budget: _ScanBudget,
) -> None:
    key = _member_key(info)
    must_scan = key in pickled or key.endswith(_PICKLE_SUFFIXES)
    if key in raw and not must_scan:
        return  # raw weight bytes: never unpickled, and may start with any byte
    with archive.open(info) as member:
        magic = member.read(len(_ZIP_MAGIC))
    if magic == _ZIP_MAGIC:
        _vet_nested_zip(archive, info, budget)
    elif must_scan or _starts_with_proto(magic):
        scan_pickle(_read_capped(archive, info, info.filename, budget), info.filename)


def _vet_nested_zip(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _ScanBudget) -> None:
    """Scan the *.pkl members of a nested torch.save zip.

    torch unpickles only those (data.pkl, or constants.pkl for TorchScript); its
    storage records are raw bytes that may start with any byte.
    """
    if info.compress_type == zipfile.ZIP_STORED:
        source: IO[bytes] = archive.open(info)  # read in place: nothing to inflate
    else:
        source = io.BytesIO(_read_capped(archive, info, info.filename, budget))
    with source, zipfile.ZipFile(source) as nested:
        _check_layout(source, nested)
        for inner in nested.infolist():
            if inner.filename.lower().endswith(".pkl"):
                where = f"{info.filename}:{inner.filename}"
                scan_pickle(_read_capped(nested, inner, where, budget), where)


def _read_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, budget: _ScanBudget) -> bytes:
    """Read a member we must inspect whole, refusing sizes no legitimate pt2 needs."""
    if info.file_size > MAX_PICKLE_BYTES:
        raise UnsafeModelFile(
            f"member {where!r} is {info.file_size} bytes; members over {MAX_PICKLE_BYTES} bytes "
            "cannot be vetted and are refused"
        )
    if info.file_size > budget.left:
        raise UnsafeModelFile(f"vetting the archive needs more than {MAX_SCAN_BYTES} bytes; refusing it")
    data = archive.read(info)  # zipfile stops at the declared size, whatever the stream holds
    budget.left -= len(data)
    return data


def _scan_one_pickle(stream: IO[bytes], where: str) -> None:
    """Check one pickle (up to STOP), simulating just enough stack and memo to name its globals."""
    stack: list[object] = []
    memo: dict[int, object] = {}
    for opcode, arg, _position in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attribute = arg.partition(" ")
            _check_global(module, attribute, where)
        elif name == "STACK_GLOBAL":
            if len(stack) < 2 or not all(isinstance(item, str) for item in stack[-2:]):
                raise UnsafeModelFile(
                    f"pickle member {where!r} uses STACK_GLOBAL on values that are not plain strings, "
                    "which is not allowed"
                )
            _check_global(stack[-2], stack[-1], where)
        elif name in _EXTENSION_OPS:
            raise UnsafeModelFile(f"pickle member {where!r} uses the {name} opcode, which is not allowed")

        if name == "MEMOIZE":
            memo[len(memo)] = _stack_top(stack, name)
        elif name in _MEMO_PUT_OPS:
            memo[arg] = _stack_top(stack, name)
        elif name in _MEMO_GET_OPS:
            if arg not in memo:
                raise ValueError(f"{name} of unknown memo key {arg}")
            stack.append(memo[arg])
        elif name in _STRING_OPS:
            stack.append(arg)
        else:
            _apply_stack_effect(opcode, stack)


def _check_global(module: object, attribute: object, where: str) -> None:
    if (module, attribute) not in ALLOWED_GLOBALS:
        raise UnsafeModelFile(
            f"pickle member {where!r} references {f'{module}.{attribute}'!r}, which is not allowed"
        )


def _stack_top(stack: list[object], name: str) -> object:
    if not stack or stack[-1] is _MARK:
        raise ValueError(f"{name} with an empty stack")
    return stack[-1]


def _apply_stack_effect(opcode: pickletools.OpcodeInfo, stack: list[object]) -> None:
    """Pop and push as pickletools documents for `opcode`, keeping tracked strings at their true depth."""
    before = opcode.stack_before
    if pickletools.markobject in before:
        while True:
            if not stack:
                raise ValueError(f"{opcode.name} without a MARK")
            if stack.pop() is _MARK:
                break
        count = before.index(pickletools.markobject)
    elif opcode.name == "POP" and stack and stack[-1] is _MARK:
        stack.pop()  # POP on an empty frame discards the MARK itself
        count = 0
    else:
        count = len(before)
    for _ in range(count):
        if not stack or stack[-1] is _MARK:
            raise ValueError(f"{opcode.name} on a stack that is too short")
        stack.pop()
    stack.extend(_MARK if item is pickletools.markobject else _UNKNOWN for item in opcode.stack_after)
