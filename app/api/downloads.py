"""Streaming downloads from the artifact store with ETag, If-None-Match and single-range `Range` support."""

import re
import unicodedata
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from app.api.conditional import etag_matches
from app.core.storage import Storage

_RANGE = re.compile(r"^(\d*)-(\d*)$")
# RFC 8187 attr-char: what filename* may carry unencoded.
_ATTR_CHARS = "!#$&+-.^_`|~"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class _Unsatisfiable(Exception):
    pass


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end) inclusive of a single byte range; None when the header is to be ignored and the whole body
    sent (RFC 9110 14.2: a unit other than `bytes`, or several ranges). Raises _Unsatisfiable for a byte range
    that is malformed or does not overlap the content (416)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _RANGE.match(spec.strip())
    if not match or (not match.group(1) and not match.group(2)):
        raise _Unsatisfiable
    first, last = match.groups()
    if not first:  # suffix range: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise _Unsatisfiable
    return start, end


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII `filename` for old clients and the exact name as RFC 8187 `filename*` (RFC 6266).

    Header values are Latin-1 and end at CR/LF: a name such as `модель.pt2` made the header unencodable (500)
    and one with a newline broke the response. Control characters are dropped from both forms; the fallback also
    loses quotes, backslashes and what has no ASCII form (`модель.pt2` -> `download.pt2`)."""
    name = _CONTROL.sub("", filename).strip() or "download"
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    ascii_name = re.sub(r'["\\]', "", ascii_name).replace("/", "_").strip()
    stem, dot, extension = ascii_name.rpartition(".")
    if not ascii_name or (dot and not stem.strip(" ._-")) or not ascii_name.strip(" ._-"):
        ascii_name = f"download.{extension}" if dot and extension else "download"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe=_ATTR_CHARS)}"


def stream_object(request: Request, storage: Storage, key: str, *, size: int, sha256: str, filename: str,
                  media_type: str = "application/octet-stream") -> Response:
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Disposition": content_disposition(filename)}
    if etag_matches(request, etag):
        return Response(status_code=304, headers=headers)
    range_header = request.headers.get("range")
    try:
        span = _parse_range(range_header, size) if range_header else None
    except _Unsatisfiable:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    if span is not None:
        start, end = span
        headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
        return StreamingResponse(storage.open_range(key, start, end), status_code=206, headers=headers,
                                 media_type=media_type)
    headers["Content-Length"] = str(size)
    return StreamingResponse(storage.open_range(key), headers=headers, media_type=media_type)
