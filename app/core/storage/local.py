"""Filesystem storage for ``file:///abs/path`` URLs (one host, or a volume shared by API and workers)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from app.core.storage.base import ObjectNotFound, Storage, StorageError, validate_key, validate_prefix, validate_range

# In-flight writes live next to their target under this name: os.replace then
# stays on one filesystem (atomic), and list_keys can skip half-written files.
_TMP_PREFIX = ".modelpress-tmp-"

# What the OS raises when a key has no regular file behind it.
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)

_COPY_BUFFER = 1 << 20


class LocalStorage(Storage):
    """Objects are plain files under ``root``; keys map to relative paths."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise ValueError(f"expected a file:///absolute/path URL, got {url!r}")
        path = unquote(parts.path)
        if not os.path.isabs(path):
            raise ValueError(f"local storage root must be an absolute path, got {url!r}")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create local storage root {path!r}: {exc}") from exc
        self.url = url
        self.root = Path(path).resolve()

    def put_file(self, key: str, path: os.PathLike) -> None:
        dest = self._path(key)
        try:
            with open(path, "rb") as src:
                dest.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(src, dest)
        except OSError as exc:
            raise StorageError(f"cannot store {key!r} from {os.fspath(path)!r}: {exc}") from exc

    def get_file(self, key: str, path: os.PathLike) -> None:
        with self._open(key) as src:
            try:
                _write_atomic(src, Path(path))
            except OSError as exc:
                raise StorageError(f"cannot copy {key!r} to {os.fspath(path)!r}: {exc}") from exc

    def open_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        validate_range(start, end, chunk_size)
        return _iter_file(self._open(key), key, start, end, chunk_size)

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            st = path.stat()
        except _MISSING as exc:
            raise ObjectNotFound(f"no object at {key!r}") from exc
        except OSError as exc:
            raise StorageError(f"cannot stat {key!r}: {exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"no object at {key!r}")
        return st.st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if not path.is_file():
            return  # missing, or a directory, which is not an object
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {key!r}: {exc}") from exc

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            self.delete(key)
        self._remove_empty_dirs(self._prefix_dir(prefix))
        return len(keys)

    def list_keys(self, prefix: str = "") -> list[str]:
        keys = []
        for dirpath, _dirnames, filenames in os.walk(self._prefix_dir(prefix), onerror=_raise_unless_missing):
            for name in filenames:
                if not name.startswith(_TMP_PREFIX):
                    keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"local storage root {str(self.root)!r} is missing or not writable")

    def _path(self, key: str) -> Path:
        """Map a key to a resolved path; refuse anything (e.g. a symlink) that lands outside root."""
        try:
            path = (self.root / validate_key(key)).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop
            raise StorageError(f"cannot resolve {key!r}: {exc}") from exc
        if not path.is_relative_to(self.root):
            raise StorageError(f"key {key!r} resolves outside the storage root")
        return path

    def _prefix_dir(self, prefix: str) -> Path:
        prefix = validate_prefix(prefix)
        return self._path(prefix) if prefix else self.root

    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except _MISSING as exc:
            raise ObjectNotFound(f"no object at {key!r}") from exc
        except OSError as exc:
            raise StorageError(f"cannot open {key!r}: {exc}") from exc

    def _remove_empty_dirs(self, top: Path) -> None:
        """Drop directories a prefix delete emptied; non-empty ones (in-flight writes) stay."""
        for dirpath, _dirnames, _filenames in os.walk(top, topdown=False):
            if Path(dirpath) != self.root:
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)


def _write_atomic(src: BinaryIO, dest: Path) -> None:
    """Stream ``src`` to a temp file beside ``dest`` and rename it, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, _COPY_BUFFER)
            out.flush()
            os.fsync(out.fileno())  # data must be on disk before the rename makes it visible
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; API and workers may run as different users
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _iter_file(f: BinaryIO, key: str, start: int, end: int | None, chunk_size: int) -> Iterator[bytes]:
    """Yield ``f[start:end + 1]`` in chunks, then close ``f``."""
    remaining = None if end is None else end - start + 1
    with f:
        try:
            f.seek(start)
            while remaining is None or remaining > 0:
                data = f.read(chunk_size if remaining is None else min(chunk_size, remaining))
                if not data:
                    return
                if remaining is not None:
                    remaining -= len(data)
                yield data
        except OSError as exc:
            raise StorageError(f"cannot read {key!r}: {exc}") from exc


def _raise_unless_missing(exc: OSError) -> None:
    """os.walk error hook: a missing prefix just lists nothing, anything else is a real failure."""
    if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        raise StorageError(f"cannot list {exc.filename!r}: {exc}") from exc
