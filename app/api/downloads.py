"""Streaming downloads from the artifact store with ETag, If-None-Match and single-range `Range` support."""

import re

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from app.api.conditional import etag_matches
from app.core.storage import Storage

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Returns (start, end) inclusive, or None when unsatisfiable. Multi-range requests get the whole body."""
    match = _RANGE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.groups()
    if not first:  # suffix range: the last N bytes
        length = int(last)
        if length == 0:
            return None
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return start, end


def stream_object(request: Request, storage: Storage, key: str, *, size: int, sha256: str, filename: str,
                  media_type: str = "application/octet-stream") -> Response:
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes",
               "Content-Disposition": f'attachment; filename="{filename}"'}
    if etag_matches(request, etag):
        return Response(status_code=304, headers=headers)
    range_header = request.headers.get("range")
    if range_header and "," not in range_header:
        span = _parse_range(range_header, size)
        if span is None:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        start, end = span
        headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
        return StreamingResponse(storage.open_range(key, start, end), status_code=206, headers=headers,
                                 media_type=media_type)
    headers["Content-Length"] = str(size)
    return StreamingResponse(storage.open_range(key), headers=headers, media_type=media_type)
