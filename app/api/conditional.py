"""Conditional requests: an `If-None-Match` that names the current ETag gets a body-less 304."""

from fastapi import Request


def etag_matches(request: Request, etag: str) -> bool:
    """True when the request's If-None-Match lists `etag` (a list of tags, or `*`)."""
    tags = [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]
    return etag in tags or "*" in tags
