"""Streaming multipart uploads: the body goes to a temp file chunk by chunk, hashed on the way.

The API never holds an upload in memory, answers 413 as soon as the declared or received size passes the
limit, and removes partial files whatever happens.
"""

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.core.errors import ErrorCode, ServiceError
from app.core.recipe import no_control_characters

MAX_TEXT_FIELD = 1024
LONGER_TEXT_FIELDS = {"input_specs": 64 * 1024}  # JSON fields: a constant may hold a few thousand numbers
MULTIPART_OVERHEAD = 64 * 1024


@dataclass
class UploadedFile:
    path: Path
    filename: str
    size: int
    sha256: str


@dataclass
class ParsedUpload:
    file: UploadedFile | None = None
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        if self.file is not None:
            self.file.path.unlink(missing_ok=True)


def _refuse_control_characters(field: str, value: str, what: str = "") -> None:
    """Names given at upload become download file names, listings and log lines: a control character (NUL, CR, LF,
    ...) in one is refused (422, naming the field) rather than silently changed."""
    try:
        no_control_characters(value)
    except ValueError as exc:
        raise ServiceError(ErrorCode.INVALID_REQUEST, f"{field}: {what}{exc}") from None


class _Collector:
    """Receives python-multipart callbacks; writes the `file` part to disk and keeps small text fields."""

    def __init__(self, tmp_dir: Path, max_bytes: int, file_field: str, text_fields: set[str]):
        self.tmp_dir, self.max_bytes = tmp_dir, max_bytes
        self.file_field, self.text_fields = file_field, text_fields
        self.result = ParsedUpload()
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._part: str | None = None
        self._text = bytearray()
        self._fh = None
        self._hash = None
        self._size = 0

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value_cb, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end}

    def _part_begin(self) -> None:
        self._headers, self._part, self._text = {}, None, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name == self.file_field:
            if self.result.file is not None or self._fh is not None:
                raise ServiceError(ErrorCode.BAD_REQUEST, f"only one '{self.file_field}' part is allowed")
            filename = params.get(b"filename", b"").decode("utf-8", "replace")
            if not filename:
                raise ServiceError(ErrorCode.INVALID_REQUEST,
                                   f"{self.file_field}: the part must be a file with a filename")
            _refuse_control_characters(self.file_field, filename, "the filename ")
            self._part = name
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-", suffix=".part")
            self._fh = os.fdopen(fd, "wb")
            self._hash = hashlib.sha256()
            self._size = 0
            self.result.file = UploadedFile(Path(tmp), Path(filename).name, 0, "")
        elif name in self.text_fields:
            self._part = name
        else:
            allowed = ", ".join([self.file_field, *sorted(self.text_fields)])
            raise ServiceError(ErrorCode.INVALID_REQUEST,
                               f"{name or '(unnamed)'}: unknown form field; expected {allowed}")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._fh is not None:
            self._size += len(chunk)
            if self._size > self.max_bytes:
                raise ServiceError(ErrorCode.TOO_LARGE, f"file is larger than the limit of {self.max_bytes} bytes")
            self._fh.write(chunk)
            self._hash.update(chunk)
        else:
            self._text += chunk
            limit = LONGER_TEXT_FIELDS.get(self._part, MAX_TEXT_FIELD)
            if len(self._text) > limit:
                raise ServiceError(ErrorCode.INVALID_REQUEST, f"{self._part}: value longer than {limit} bytes")

    def _part_end(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self.result.file.size = self._size
            self.result.file.sha256 = self._hash.hexdigest()
        elif self._part is not None:
            value = self._text.decode("utf-8", "replace").strip()
            if self._part not in LONGER_TEXT_FIELDS:  # JSON may span lines; its parser judges it
                _refuse_control_characters(self._part, value)
            self.result.fields[self._part] = value

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


async def receive_upload(request: Request, tmp_dir: Path, max_bytes: int, text_fields: set[str],
                         file_field: str = "file") -> ParsedUpload:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise ServiceError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                           "uploads must be multipart/form-data with a boundary, the file in a part named 'file'")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise ServiceError(ErrorCode.TOO_LARGE, f"request body of {declared} bytes is larger than the limit of "
                                                f"{max_bytes} bytes")
    collector = _Collector(tmp_dir, max_bytes, file_field, text_fields)
    parser = MultipartParser(params[b"boundary"], collector.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            # Counted here too: a body without Content-Length may grow by other means than the file (endless small
            # parts, junk after the closing boundary, which the parser skips).
            received += len(chunk)
            if received > max_bytes + MULTIPART_OVERHEAD:
                raise ServiceError(ErrorCode.TOO_LARGE, f"request body is larger than the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
        if collector.result.file is None:
            raise ServiceError(ErrorCode.INVALID_REQUEST, f"{file_field}: field required (a multipart file part)")
        if collector.result.file.sha256 == "":
            raise ServiceError(ErrorCode.BAD_REQUEST, "malformed multipart body: the file part never ended")
    except ServiceError:
        collector.close()
        collector.result.discard()
        raise
    except Exception as exc:  # python-multipart parse errors, client disconnects
        collector.close()
        collector.result.discard()
        # The parser says what is wrong and where ("Maximum header size exceeded"); anything else is named only.
        detail = str(exc) if isinstance(exc, MultipartParseError) else exc.__class__.__name__
        raise ServiceError(ErrorCode.BAD_REQUEST, f"malformed multipart body: {detail}") from None
    return collector.result
