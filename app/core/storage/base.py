"""Storage interface shared by all artifact backends, plus key validation.

Keys are relative POSIX paths such as ``tenants/t1/models/m1/model.onnx``.
They are validated up front so that no backend ever sees a key that could
escape its root or mean different things on different backends.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator


class StorageError(Exception):
    """A backend operation failed; hides backend-specific exception types from callers."""


class ObjectNotFound(StorageError):
    """The requested key does not exist in the store."""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative POSIX path, else raise ValueError."""
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string")
    if "\x00" in key:
        raise ValueError(f"storage key contains a NUL byte: {key!r}")
    if "\\" in key:
        raise ValueError(f"storage key must use '/' separators, not backslashes: {key!r}")
    if key.startswith("/"):
        raise ValueError(f"storage key must be relative, not absolute: {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"storage key has an empty, '.' or '..' segment: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Validate a folder-like prefix and return it without a trailing '/'.

    ``""`` means the whole store. Prefixes are matched on whole path segments,
    so ``tenants/t1`` covers ``tenants/t1/...`` but never ``tenants/t10/...``.
    """
    if prefix == "":
        return ""
    return validate_key(prefix[:-1] if prefix.endswith("/") else prefix)


def validate_range(start: int, end: int | None, chunk_size: int) -> None:
    """Reject byte ranges that no backend could serve meaningfully."""
    if start < 0:
        raise ValueError(f"range start must be >= 0, got {start}")
    if end is not None and end < start:
        raise ValueError(f"range end ({end}) must be >= start ({start})")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")


class Storage(ABC):
    """Artifact store addressed by relative POSIX keys.

    Every method validates its key or prefix (ValueError) before touching the
    backend, raises ObjectNotFound for a missing key where an object is
    required, and reports backend failures as StorageError.
    """

    url: str

    @abstractmethod
    def put_file(self, key: str, path: os.PathLike) -> None:
        """Upload a local file, streamed; readers never see a partial object."""

    @abstractmethod
    def get_file(self, key: str, path: os.PathLike) -> None:
        """Download an object to a local path, streamed."""

    @abstractmethod
    def open_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        """Yield bytes ``start..end`` inclusive (``end=None``: to EOF), clipped to the object.

        The object is opened eagerly, so ObjectNotFound is raised by the call
        itself, before a caller commits to a streaming response.
        """

    @abstractmethod
    def size(self, key: str) -> int:
        """Return the object size in bytes."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Return whether an object is stored under ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete an object; a missing key is not an error, so retries are safe."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder ``prefix``; return how many were deleted."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Return the sorted keys under the folder ``prefix`` (``""``: whole store)."""

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError if the backend is unusable; used by readiness probes."""
