"""Artifact storage: one interface, with the backend chosen by the storage URL's scheme."""

from urllib.parse import urlsplit

from app.core.storage.base import ObjectNotFound, Storage, StorageError, validate_key
from app.core.storage.local import LocalStorage
from app.core.storage.s3 import S3Storage

__all__ = ["ObjectNotFound", "Storage", "StorageError", "open_storage", "validate_key"]


def open_storage(url: str) -> Storage:
    """Build the backend for ``url``: file:///abs/path or s3://bucket/optional/prefix."""
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return LocalStorage(url)
    if scheme == "s3":
        return S3Storage(url)
    raise ValueError(
        f"unsupported storage URL {url!r}: supported schemes are file:// (file:///abs/path) "
        "and s3:// (s3://bucket/optional/prefix)"
    )
