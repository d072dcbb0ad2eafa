"""What pt2 vetting and format detection share about zip files: the magic numbers, the end records, the
errors zipfile raises, and the checks that Python's zipfile and torch's C++ zip reader see the same members.

Pure stdlib (the API process imports it); nothing here reads member contents.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import PureWindowsPath
from typing import IO

from app.core.errors import ErrorCode
from app.core.vetting.refusals import UnsupportedModelFile

ZIP_MAGIC = b"PK\x03\x04"
ZIP_END_MAGIC = b"PK\x05\x06"  # also how an empty zip starts
_ZIP_END_RECORD = struct.Struct("<4s4xHHIIH")  # signature, entries, entries, cd size, cd offset, comment length
_ZIP64_LOCATOR_MAGIC = b"PK\x06\x07"
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # signature, disk, zip64 end record offset, disks
_ZIP64_END_MAGIC = b"PK\x06\x06"
_ZIP64_END_RECORD = struct.Struct("<4sQHHIIQQQQ")  # signature, ..., cd size, cd offset
_ZIP32_SATURATED = 0xFFFFFFFF
_ZIP_UTF8_FLAG = 0x800

# Errors the zipfile module raises on damaged or hostile archives.
ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    ValueError,
    OverflowError,
    NotImplementedError,
    RuntimeError,
    zlib.error,
)


_ZIP_END_FIELDS = struct.Struct("<4sHHHHIIH")  # signature, disks, entries here, entries, cd size, cd offset, comment
# signature, record size, versions, disks, entries here, entries, cd size, cd offset
_ZIP64_END_FIELDS = struct.Struct("<4sQHHIIQQQQ")
_ZIP16_SATURATED = 0xFFFF
# Members of any zip the service opens; every archive it reads has far fewer (see the callers' own caps).
MAX_ZIP_ENTRIES = 20_000
# The central directory zipfile reads whole: entries of a few hundred bytes each at most.
MAX_ZIP_DIRECTORY_BYTES = 8 * 1024 * 1024


def directory_size(file: IO[bytes]) -> tuple[int, int] | None:
    """(entries, central directory bytes) as the end record declares them, read before zipfile parses the
    directory (which costs memory per entry); None when there is no end record (zipfile then says what is wrong)."""
    size = file.seek(0, io.SEEK_END)
    tail_len = min(size, _ZIP_END_FIELDS.size + 0xFFFF)  # the end record, then at most a 64 KiB comment
    file.seek(size - tail_len)
    tail = file.read(tail_len)
    at = tail.rfind(ZIP_END_MAGIC)
    if at < 0 or at + _ZIP_END_FIELDS.size > len(tail):
        return None
    _, _, _, _, entries, directory, _, _ = _ZIP_END_FIELDS.unpack_from(tail, at)
    if entries == _ZIP16_SATURATED or directory == _ZIP32_SATURATED:
        end_at = size - tail_len + at
        if end_at >= _ZIP64_LOCATOR.size:
            file.seek(end_at - _ZIP64_LOCATOR.size)
            magic, _, record_at, _ = _ZIP64_LOCATOR.unpack(file.read(_ZIP64_LOCATOR.size))
            if magic == _ZIP64_LOCATOR_MAGIC and record_at + _ZIP64_END_FIELDS.size <= size:
                file.seek(record_at)
                record = _ZIP64_END_FIELDS.unpack(file.read(_ZIP64_END_FIELDS.size))
                if record[0] == _ZIP64_END_MAGIC:
                    entries, directory = record[7], record[8]
    return entries, directory


def check_directory(file: IO[bytes], subject: str, max_entries: int = MAX_ZIP_ENTRIES) -> None:
    """Refuse a zip with more members, or a bigger directory, than any model archive has, before reading it."""
    declared = directory_size(file)
    if declared is None:
        return
    entries, directory = declared
    if entries > max_entries or directory > MAX_ZIP_DIRECTORY_BYTES:
        raise UnsupportedModelFile(
            ErrorCode.ARCHIVE_TOO_LARGE,
            f"{subject} declares {entries} members in a {directory}-byte directory; at most {max_entries} members "
            f"and {MAX_ZIP_DIRECTORY_BYTES} bytes are read",
        )


def member_key(info: zipfile.ZipInfo) -> bytes:
    """The name as stored, ASCII-lowercased: that is how torch's C++ zip reader finds members."""
    encoding = "utf-8" if info.flag_bits & _ZIP_UTF8_FLAG else "cp437"
    return info.filename.encode(encoding).lower()


def check_layout(file: IO[bytes], archive: zipfile.ZipFile) -> None:
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
    if magic != ZIP_END_MAGIC or comment_length:
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
                raise UnsupportedModelFile(
                    ErrorCode.CORRUPT_ARCHIVE, "the zip archive has an inconsistent zip64 record"
                )
            if offset not in (record[-1], _ZIP32_SATURATED):
                raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, "the zip archive has conflicting end records")
            offset = record[-1]
    if archive.start_dir != offset:
        raise UnsupportedModelFile(ErrorCode.CORRUPT_ARCHIVE, "the zip archive has data in front of it or is truncated")


def check_member_names(infos: list[zipfile.ZipInfo]) -> None:
    """Refuse names that escape a directory or that different zip readers resolve differently."""
    seen: set[bytes] = set()
    for info in infos:
        as_windows = PureWindowsPath(info.filename)  # splits on "/" and "\" and knows drives
        if info.orig_filename != info.filename or as_windows.drive or as_windows.root or ".." in as_windows.parts:
            raise UnsupportedModelFile(
                ErrorCode.CORRUPT_ARCHIVE, f"archive member name {info.orig_filename!r} is not allowed"
            )
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise UnsupportedModelFile(
                ErrorCode.CORRUPT_ARCHIVE, f"archive member {info.filename!r} uses an unsupported compression method"
            )
        key = member_key(info)
        if key in seen:
            raise UnsupportedModelFile(
                ErrorCode.CORRUPT_ARCHIVE, f"archive member {info.filename!r} appears more than once"
            )
        seen.add(key)
