"""S3 storage (AWS or S3-compatible such as MinIO) for ``s3://bucket/optional/prefix`` URLs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from app.core.storage.base import ObjectNotFound, Storage, StorageError, validate_key, validate_prefix, validate_range

# Error codes S3 uses for a missing object (HEAD responses carry only the status).
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})

_DELETE_BATCH = 1000  # DeleteObjects accepts at most this many keys per call


class S3Storage(Storage):
    """Objects live under ``prefix`` in ``bucket``; credentials come from the standard AWS chain."""

    def __init__(self, url: str, *, endpoint_url: str | None = None) -> None:
        # boto3 is imported here, not at module level, so `import app.core.storage` stays cheap.
        import boto3
        from botocore.config import Config

        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"expected an s3://bucket/optional/prefix URL, got {url!r}")
        prefix = parts.path.strip("/")
        self.url = url
        self.bucket = parts.netloc
        self.prefix = validate_key(prefix) if prefix else ""

        endpoint = (
            endpoint_url
            or os.environ.get("MODELPRESS_S3_ENDPOINT_URL")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or None
        )
        session = boto3.session.Session()
        region = os.environ.get("AWS_REGION") or session.region_name or "us-east-1"
        config = Config(
            # Short enough that /readyz answers promptly when S3 is down.
            connect_timeout=3,
            read_timeout=20,
            retries={"max_attempts": 3, "mode": "standard"},
            # Self-hosted endpoints (MinIO, moto) usually lack bucket-name subdomains.
            s3={"addressing_style": "path"} if endpoint else None,
        )
        self._client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)

    def put_file(self, key: str, path: os.PathLike) -> None:
        full_key = self._key(key)
        with self._errors("upload", key):
            # upload_file switches to multipart above 8 MiB, so big models never sit in memory.
            self._client.upload_file(os.fspath(path), self.bucket, full_key)

    def get_file(self, key: str, path: os.PathLike) -> None:
        full_key = self._key(key)
        with self._errors("download", key):
            self._client.download_file(self.bucket, full_key, os.fspath(path))

    def open_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        validate_range(start, end, chunk_size)
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or end is not None:
            # No Range header for a whole read: S3 rejects "bytes=0-" on an empty object.
            request["Range"] = f"bytes={start}-{'' if end is None else end}"
        with self._errors("read", key):
            try:
                response = self._client.get_object(**request)
            except ClientError as exc:
                if _error_code(exc) != "InvalidRange":
                    raise
                return iter(())  # start is past the end: nothing to yield, like a local file
        return self._iter_body(response["Body"], key, chunk_size)

    def size(self, key: str) -> int:
        full_key = self._key(key)
        with self._errors("head", key):
            return self._client.head_object(Bucket=self.bucket, Key=full_key)["ContentLength"]

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        full_key = self._key(key)
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=full_key)

    def delete_prefix(self, prefix: str) -> int:
        full_keys = self._list_full_keys(self._folder(prefix))
        for i in range(0, len(full_keys), _DELETE_BATCH):
            batch = full_keys[i : i + _DELETE_BATCH]
            with self._errors("delete"):
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            # DeleteObjects reports per-key failures in the body of a 200 response.
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"S3 delete failed for {len(errors)} object(s) in s3://{self.bucket}, "
                    f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )
        return len(full_keys)

    def list_keys(self, prefix: str = "") -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in self._list_full_keys(self._folder(prefix)))

    def check(self) -> None:
        with self._errors("head_bucket"):
            self._client.head_bucket(Bucket=self.bucket)

    def _key(self, key: str) -> str:
        key = validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _folder(self, prefix: str) -> str:
        """S3 Prefix for a folder-like prefix; the trailing '/' keeps 't1' from matching 't10'."""
        prefix = validate_prefix(prefix)
        full = "/".join(p for p in (self.prefix, prefix) if p)
        return f"{full}/" if full else ""

    def _list_full_keys(self, folder: str) -> list[str]:
        keys: list[str] = []
        with self._errors("list"):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
            for page in pages:
                # Keys ending in '/' are console "folder" markers, not objects.
                keys.extend(o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/"))
        return keys

    def _iter_body(self, body: Any, key: str, chunk_size: int) -> Iterator[bytes]:
        try:
            with self._errors("read", key):
                yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    @contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Turn boto exceptions into StorageError, or ObjectNotFound when ``key`` is missing."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"s3://{self.bucket}/{self._key(key)}" if key else f"s3://{self.bucket}"
        try:
            yield
        except ClientError as exc:
            code = _error_code(exc)
            if key is not None and code in _NOT_FOUND_CODES:
                raise ObjectNotFound(f"no object at {where}") from exc
            message = exc.response.get("Error", {}).get("Message", "")
            raise StorageError(f"S3 {action} failed for {where}: {code} {message}".rstrip()) from exc
        except (BotoCoreError, S3UploadFailedError, OSError) as exc:
            raise StorageError(f"S3 {action} failed for {where}: {exc}") from exc


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
