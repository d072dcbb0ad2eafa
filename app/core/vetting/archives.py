"""Listing and extracting uploaded zip and tar(.gz) archives without trusting them.

The API lists an archive at upload (no extraction) and the worker extracts it before loading a model, so
this module is pure stdlib. The kind of archive is judged by content, never by the file name. Every member
name is checked before anything is written: no absolute paths, no `..`, no backslashes, no links or special
files, no duplicates. Sizes are checked twice: the declared sizes when listing, and the bytes actually
written while extracting, so an archive whose headers lie is stopped as soon as it writes too much.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from app.core.errors import ErrorCode, ServiceError

DEFAULT_MAX_FILES = 2000
# Four times the default upload limit (MODELPRESS_MAX_UPLOAD_BYTES = 2 GiB); callers pass their own.
DEFAULT_MAX_TOTAL_BYTES = 4 * 2 * 1024**3

ZIP, TAR_GZ, TAR = "zip", "tar.gz", "tar"
# What a file system takes: longer names fail to extract (OSError), so they are refused when listed.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 1024

# Long-name and pax records are read whole into memory by tarfile; genuine ones are a few hundred bytes.
_MAX_TAR_METADATA_BYTES = 64 * 1024
_TAR_METADATA_TYPES = frozenset(
    {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
)
_ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
_ZIP_ENCRYPTED_FLAG = 0x1
_CHUNK = 1024 * 1024
# macOS Finder adds resource forks under this folder; they are never part of a model.
_IGNORED_TOP_FOLDER = "__MACOSX"

_CORRUPT_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    gzip.BadGzipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    ValueError,
    OverflowError,
    NotImplementedError,
    RecursionError,  # tarfile follows chained pax headers recursively
)


class ArchiveError(ServiceError):
    """An archive we refuse: unsafe_archive, archive_too_large or corrupt_archive."""


@dataclass(frozen=True)
class ArchiveListing:
    """What an archive holds, after every safety rule passed."""

    kind: str  # "zip", "tar.gz" or "tar": also the extension to store it under
    root: str  # the single top-level folder everything sits in, or "" when files sit at the top
    files: dict[str, int]  # file path relative to `root` -> declared size in bytes
    total_bytes: int

    def member(self, relative: str) -> str:
        """The archive path of a file named relative to the root (what `read_member` takes)."""
        return f"{self.root}/{relative}" if self.root else relative


def archive_kind(path: Path) -> str | None:
    """"zip", "tar.gz" or "tar" from the first bytes of the file; None for anything else."""
    with path.open("rb") as file:
        head = file.read(tarfile.BLOCKSIZE)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ZIP
    if _is_tar_header(head):
        return TAR
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path) as stream:
                first = stream.read(tarfile.BLOCKSIZE)  # inflates just the first header block
        except (OSError, EOFError, zlib.error):
            return None
        return TAR_GZ if _is_tar_header(first) else None
    return None


def list_archive(
    path: Path,
    *,
    max_files: int = DEFAULT_MAX_FILES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_member_bytes: int | None = None,
) -> ArchiveListing:
    """Check every member against the rules without writing anything; raises ArchiveError."""
    kind = _require_kind(path)
    rules = _Rules(max_files, max_total_bytes, max_member_bytes)
    try:
        if kind == ZIP:
            with zipfile.ZipFile(path) as archive:
                list(_zip_members(archive, rules))
        else:
            with _open_tar(path, kind) as tar:
                list(_tar_members(tar, rules))
    except _CORRUPT_ERRORS as exc:
        raise _corrupt(exc) from None
    root = rules.single_root()
    prefix = f"{root}/" if root else ""
    files = {name.removeprefix(prefix): size for name, size in rules.files.items()}
    return ArchiveListing(kind=kind, root=root, files=files, total_bytes=rules.declared)


def read_member(path: Path, name: str, *, max_bytes: int) -> bytes:
    """The content of one file (its normalised archive path), refusing more than `max_bytes`."""
    kind = _require_kind(path)
    try:
        if kind == ZIP:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and _normalise(info.orig_filename) == name:
                        with archive.open(info) as member:
                            return _read_capped(member, name, max_bytes)
        else:
            with _open_tar(path, kind) as tar:
                for info in tar:
                    if info.isreg() and _normalise(info.name) == name:
                        member = tar.extractfile(info)
                        assert member is not None  # regular files always have content
                        return _read_capped(member, name, max_bytes)
    except _CORRUPT_ERRORS as exc:
        raise _corrupt(exc) from None
    raise ArchiveError(ErrorCode.CORRUPT_ARCHIVE, f"the archive has no file {name!r}")


def extract_archive(
    path: Path,
    dest: Path,
    *,
    max_files: int = DEFAULT_MAX_FILES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_member_bytes: int | None = None,
    include: Callable[[str], bool] | None = None,
) -> Path:
    """Extract into `dest` (missing or empty) and return the model root: the single top folder, or `dest`.

    Every member is vetted; with `include`, only the files it accepts (by their normalised path) are written.
    On any error everything written under `dest` is removed again.
    """
    kind = _require_kind(path)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"extraction folder {dest} is not empty")
    rules = _Rules(max_files, max_total_bytes, max_member_bytes)
    writer = _Writer(dest.resolve(), rules)
    try:
        if kind == ZIP:
            with zipfile.ZipFile(path) as archive:
                members = list(_zip_members(archive, rules))  # the whole directory is vetted first
                for info, name in members:
                    if name in rules.folders:
                        writer.directory(name)
                    elif include is None or include(name):
                        with archive.open(info) as source:
                            writer.file(name, source)
        else:
            with _open_tar(path, kind) as tar:
                for info, name in _tar_members(tar, rules):
                    if name in rules.folders:
                        writer.directory(name)
                    elif include is None or include(name):
                        source = tar.extractfile(info)
                        assert source is not None  # _tar_members lets only regular files and folders through
                        writer.file(name, source)
    except BaseException as exc:
        for child in dest.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        if isinstance(exc, _CORRUPT_ERRORS):
            raise _corrupt(exc) from None
        raise
    root = rules.single_root()
    return dest / root if root else dest


class _Rules:
    """Member-by-member checks shared by listing and extraction; keeps the running counts."""

    def __init__(self, max_files: int, max_total_bytes: int, max_member_bytes: int | None) -> None:
        self.max_files = max_files
        self.max_total_bytes = max_total_bytes
        self.max_member_bytes = max_total_bytes if max_member_bytes is None else max_member_bytes
        self.count = 0
        self.declared = 0
        self.files: dict[str, int] = {}  # kept members only (not the ignored macOS folder)
        self.folders: set[str] = set()
        self._files_seen: set[str] = set()  # case-folded, so names cannot alias on any file system
        self._folders_seen: set[str] = set()
        self._parents: set[str] = set()

    def admit(self, raw_name: str, is_dir: bool, size: int) -> str | None:
        """The normalised name of an acceptable member, or None for one to skip."""
        self.count += 1
        if self.count > self.max_files:
            raise ArchiveError(ErrorCode.ARCHIVE_TOO_LARGE, f"the archive has more than {self.max_files} members")
        name = _normalise(raw_name)
        if not name:
            return None  # the archive's own "./" entry
        key = name.casefold()
        parents = [str(p).casefold() for p in PurePosixPath(name).parents][:-1]
        if key in self._files_seen or key in self._folders_seen or (not is_dir and key in self._parents):
            raise ArchiveError(ErrorCode.UNSAFE_ARCHIVE, f"archive member {raw_name!r} appears more than once (or as "
                                                         "both a file and a folder)")
        if any(parent in self._files_seen for parent in parents):
            raise ArchiveError(ErrorCode.UNSAFE_ARCHIVE, f"archive member {raw_name!r} lies inside a file")
        (self._folders_seen if is_dir else self._files_seen).add(key)
        self._parents.update(parents)
        if not is_dir:
            if size > self.max_member_bytes:
                raise ArchiveError(ErrorCode.ARCHIVE_TOO_LARGE, f"archive member {raw_name!r} is {size} bytes; the "
                                                                f"limit is {self.max_member_bytes} bytes per file")
            self.declared += size
            if self.declared > self.max_total_bytes:
                raise ArchiveError(ErrorCode.ARCHIVE_TOO_LARGE, f"the archive holds more than {self.max_total_bytes} "
                                                                "bytes uncompressed")
        if name.split("/")[0] == _IGNORED_TOP_FOLDER:
            return None
        if is_dir:
            self.folders.add(name)
        else:
            self.files[name] = size
        return name

    def single_root(self) -> str:
        """The one top-level folder that holds every kept file and folder, or ""."""
        tops = {name.split("/")[0] for name in [*self.files, *self.folders]}
        if len(tops) == 1:
            top = tops.pop()
            if top not in self.files:
                return top
        return ""


class _Writer:
    """Writes members under `dest`, counting the bytes really written against the limits."""

    def __init__(self, dest: Path, rules: _Rules) -> None:
        self.dest = dest
        self.rules = rules
        self.written = 0

    def directory(self, name: str) -> None:
        self._target(name).mkdir(parents=True, exist_ok=True)

    def file(self, name: str, source: IO[bytes]) -> None:
        target = self._target(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        declared = self.rules.files[name]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
            size = 0
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                self.written += len(chunk)
                if size > declared or size > self.rules.max_member_bytes:
                    raise ArchiveError(ErrorCode.ARCHIVE_TOO_LARGE, f"archive member {name!r} holds more bytes than "
                                                                    f"its header declares ({declared})")
                if self.written > self.rules.max_total_bytes:
                    raise ArchiveError(ErrorCode.ARCHIVE_TOO_LARGE, f"the archive holds more than "
                                                                    f"{self.rules.max_total_bytes} bytes uncompressed")
                out.write(chunk)

    def _target(self, name: str) -> Path:
        target = self.dest / name
        # Names are already checked; this guards against anything that could still resolve elsewhere.
        if not target.parent.resolve().is_relative_to(self.dest):
            raise ArchiveError(ErrorCode.UNSAFE_ARCHIVE, f"archive member {name!r} would be written outside the folder")
        return target


def _zip_members(archive: zipfile.ZipFile, rules: _Rules) -> Iterator[tuple[zipfile.ZipInfo, str]]:
    infos = archive.infolist()
    directory_start = archive.start_dir
    for info in infos:
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if stat.S_ISLNK(mode):
            raise ArchiveError(ErrorCode.UNSAFE_ARCHIVE, f"archive member {info.orig_filename!r} is a symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(ErrorCode.UNSAFE_ARCHIVE, f"archive member {info.orig_filename!r} is not a regular file")
        if info.flag_bits & _ZIP_ENCRYPTED_FLAG:
            raise ArchiveError(ErrorCode.CORRUPT_ARCHIVE, f"archive member {info.orig_filename!r} is encrypted")
        if info.compress_type not in _ZIP_METHODS:
            raise ArchiveError(ErrorCode.CORRUPT_ARCHIVE, f"archive member {info.orig_filename!r} uses an unsupported "
                                                          "compression method")
        if info.header_offset + info.compress_size > directory_start:
            raise ArchiveError(ErrorCode.CORRUPT_ARCHIVE, f"archive member {info.orig_filename!r} runs past the end of "
                                                          "the data: the archive is truncated or corrupt")
        is_dir = info.is_dir() or kind == stat.S_IFDIR
        name = rules.admit(info.orig_filename, is_dir, 0 if is_dir else info.file_size)
        if name is not None:
            yield info, name


def _tar_members(tar: tarfile.TarFile, rules: _Rules) -> Iterator[tuple[tarfile.TarInfo, str]]:
    for info in tar:
        if info.issym() or info.islnk():
            raise ArchiveError(ErrorCode.UNSAFE_ARCHIVE, f"archive member {info.name!r} is a link")
        if not (info.isreg() or info.isdir()) or info.issparse():
            raise ArchiveError(ErrorCode.UNSAFE_ARCHIVE, f"archive member {info.name!r} is not a regular file")
        name = rules.admit(info.name, info.isdir(), 0 if info.isdir() else info.size)
        if name is not None:
            yield info, name


class _GuardedTarInfo(tarfile.TarInfo):
    """Refuses oversized long-name and pax records before tarfile reads them into memory."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _TAR_METADATA_TYPES and info.size > _MAX_TAR_METADATA_BYTES:
            raise ArchiveError(ErrorCode.UNSAFE_ARCHIVE, f"the archive has a {info.size}-byte metadata record")
        return info


def _open_tar(path: Path, kind: str) -> tarfile.TarFile:
    """A streaming reader: members are visited once, in order, without seeking."""
    return tarfile.open(path, "r|gz" if kind == TAR_GZ else "r|", tarinfo=_GuardedTarInfo)


def _require_kind(path: Path) -> str:
    kind = archive_kind(path)
    if kind is None:
        raise ArchiveError(ErrorCode.CORRUPT_ARCHIVE, "the file is not a zip, tar or tar.gz archive")
    return kind


def _is_tar_header(block: bytes) -> bool:
    """POSIX (ustar) and GNU tar headers carry "ustar" at offset 257 and a valid checksum."""
    if len(block) < tarfile.BLOCKSIZE or block[257:262] != b"ustar":
        return False
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _normalise(raw_name: str) -> str:
    """The member's relative POSIX path ("" for the archive's own "./"); refuses names that could escape."""
    if "\\" in raw_name or any(ord(char) < 32 for char in raw_name):
        raise ArchiveError(ErrorCode.UNSAFE_ARCHIVE, f"archive member name {raw_name!r} has a backslash or a control "
                                                     "character")
    windows = PureWindowsPath(raw_name)
    if raw_name.startswith("/") or windows.drive or windows.root:
        raise ArchiveError(ErrorCode.UNSAFE_ARCHIVE, f"archive member name {raw_name!r} is an absolute path")
    parts = [part for part in raw_name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(ErrorCode.UNSAFE_ARCHIVE, f"archive member name {raw_name!r} goes up with '..'")
    if any(len(part.encode()) > MAX_NAME_BYTES for part in parts) or len(raw_name.encode()) > MAX_PATH_BYTES:
        raise ArchiveError(ErrorCode.UNSAFE_ARCHIVE, f"archive member name {raw_name[:80]!r}... is longer than a file "
                                                     f"name may be ({MAX_NAME_BYTES} bytes a part, {MAX_PATH_BYTES} "
                                                     "in all)")
    return "/".join(parts)


def _read_capped(member: IO[bytes], name: str, max_bytes: int) -> bytes:
    data = member.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ArchiveError(ErrorCode.ARCHIVE_TOO_LARGE, f"archive member {name!r} is larger than {max_bytes} bytes")
    return data


def _corrupt(exc: BaseException) -> ArchiveError:
    return ArchiveError(ErrorCode.CORRUPT_ARCHIVE, f"the archive is corrupt or truncated ({exc.__class__.__name__}: "
                                                   f"{str(exc)[:200]})")
