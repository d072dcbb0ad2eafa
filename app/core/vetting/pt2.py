"""Vetting of torch.export archives (.pt2): every member torch.export.load may unpickle is scanned, without
unpickling anything, before any torch code opens the file (the API at upload, the worker again at load).

Pure stdlib, so the API process can import it: it never imports torch, onnx or numpy. What members torch
unpickles is read from the archive itself (the payload configs), never from the client's filename.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from app.core.errors import ErrorCode
from app.core.vetting.pickles import scan_pickle, starts_with_proto
from app.core.vetting.refusals import UnsafeModelFile, UnsupportedModelFile
from app.core.vetting.zips import (
    ARCHIVE_ERRORS,
    ZIP_MAGIC,
    check_directory,
    check_layout,
    check_member_names,
    member_key,
)

# Pickles inside a pt2 (sample inputs, the odd pickled constant) are small; anything
# bigger is refused rather than read into the API process.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# Total bytes inflated while vetting one archive, so a zip bomb stays cheap.
MAX_SCAN_BYTES = 256 * 1024 * 1024

# torch's zip reader matches member names case-insensitively, so all name checks
# below work on lowercased names.
_PICKLE_SUFFIXES = (b".pkl", b".pt", b".pth")
# Payload files torch reads as raw bytes when the config says use_pickle=false;
# constants named custom_obj_*/opaque_obj_* are unpickled whatever the flag says.
_RAW_PAYLOAD_PREFIXES = ("weight_", "tensor_")
_PAYLOAD_DIRS = (b"weights", b"constants")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Every member torch.export.save writes for a plain exported program, under the archive's one root folder
# (torch.export.pt2_archive.constants). Anything else is refused before torch opens the file: an AOTInductor
# package (data/aotinductor/<name>/ with a shared library that torch.export.load dlopens), ExecuTorch or MTIA
# payloads, pickled custom objects, extra files.
_NAME = r"[a-z0-9_][a-z0-9_.-]*"
_PT2_MEMBERS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    rf"|models/{_NAME}\.json"
    rf"|data/weights/{_NAME}_weights_config\.json|data/weights/weight_[0-9]+"
    rf"|data/constants/{_NAME}_constants_config\.json|data/constants/tensor_[0-9]+"
    rf"|data/sample_inputs/{_NAME}\.pt"
)
# The root-level layout torch <= 2.7 wrote, which torch.export.load still reads.
_LEGACY_MEMBERS = re.compile(
    r"version|serialized_exported_program\.json|serialized_(state_dict|constants)\.(json|pt)"
    r"|serialized_example_inputs\.pt"
)


def vet_pt2(path: Path) -> None:
    """Scan every member torch.export.load may unpickle, without unpickling anything, then refuse any member
    torch.export.save does not write (native code above all).

    Sample inputs fall back to torch.load(weights_only=False), and the weights and
    constants configs can mark any payload file as pickled, so those are scanned
    whatever their name or first bytes; other members are scanned when they are
    named or look like a pickle or a nested torch.save zip.
    """
    try:
        with path.open("rb") as file:
            check_directory(file, "the pt2 archive")
        with path.open("rb") as file, zipfile.ZipFile(file) as archive:
            check_layout(file, archive)
            infos = archive.infolist()
            check_member_names(infos)
            budget = _ScanBudget()
            pickled, raw = _payload_members(archive, infos, budget)
            for info in infos:
                if not info.is_dir():
                    _vet_member(archive, info, pickled, raw, budget)
            # After the scan, so a planted pickle is reported as the unsafe pickle it is.
            check_members(infos)
    except ARCHIVE_ERRORS as exc:
        raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, f"the pt2 archive is corrupt ({exc})") from exc


def check_members(infos: list[zipfile.ZipInfo]) -> None:
    """Refuse any member that torch.export.save does not write for a plain exported program (names as torch's
    reader sees them: lowercased), and archives whose members do not share one root folder."""
    keys = [member_key(info).decode("utf-8", "replace") for info in infos if not info.is_dir()]
    if keys and all(_LEGACY_MEMBERS.fullmatch(key) for key in keys):
        return
    roots = {key.split("/", 1)[0] for key in keys}
    if len(roots) > 1:
        raise UnsupportedModelFile(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"the pt2 archive has members under {len(roots)} top-level folders; torch.export.save writes one",
        )
    for info, key in zip([i for i in infos if not i.is_dir()], keys, strict=True):
        inside = key.split("/", 1)[1] if "/" in key else ""
        if not _PT2_MEMBERS.fullmatch(inside):
            raise UnsupportedModelFile(
                ErrorCode.UNSUPPORTED_FORMAT,
                f"the pt2 archive holds {info.filename!r}, which torch.export.save does not write for an exported "
                "program (AOTInductor packages, native libraries and extra files are refused)",
            )


def is_pt2(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> bool:
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


@dataclass
class _ScanBudget:
    """Bytes we may still inflate while vetting one archive."""

    left: int = MAX_SCAN_BYTES


def _payload_members(
    archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], budget: _ScanBudget
) -> tuple[set[bytes], set[bytes]]:
    """Keys of members the payload configs have torch unpickle, and of those it reads as raw bytes."""
    keys = {member_key(info) for info in infos}
    pickled: set[bytes] = set()
    raw: set[bytes] = set()
    for info in infos:
        key = member_key(info)
        parts = key.split(b"/")
        if len(parts) < 3 or parts[-3] != b"data" or parts[-2] not in _PAYLOAD_DIRS:
            continue
        if not parts[-1].endswith(b"_config.json"):
            continue
        folder = key.rsplit(b"/", 1)[0]
        for path_name, use_pickle in _config_entries(archive, info, budget):
            target = folder + b"/" + path_name.lower().encode("ascii")
            if target not in keys:
                raise UnsupportedModelFile(
                    ErrorCode.CORRUPT_ARCHIVE, f"{info.filename!r} refers to missing member {path_name!r}"
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
            raise UnsupportedModelFile(
                ErrorCode.CORRUPT_ARCHIVE, f"{info.filename!r} has an entry with an invalid path_name {path_name!r}"
            )
        yield path_name, entry.get("use_pickle")


def _vet_member(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    pickled: set[bytes],
    raw: set[bytes],
    budget: _ScanBudget,
) -> None:
    key = member_key(info)
    must_scan = key in pickled or key.endswith(_PICKLE_SUFFIXES)
    if key in raw and not must_scan:
        return  # raw weight bytes: never unpickled, and may start with any byte
    with archive.open(info) as member:
        magic = member.read(len(ZIP_MAGIC))
    if magic == ZIP_MAGIC:
        _vet_nested_zip(archive, info, budget)
    elif must_scan or starts_with_proto(magic):
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
        check_layout(source, nested)
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
