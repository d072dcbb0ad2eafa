"""Conditional requests: an `If-None-Match` that names the current ETag gets a body-less 304.

A job's, model's or dataset's ETag is its row version (every update bumps it: app.core.tables.version_column), so a
poll can be answered 304 from one narrow read, without building the body; a list's ETag is a hash of its page's
ids and versions. Both carry the service's version, so an upgrade that changes the bodies changes the tags.
"""

import hashlib
from importlib.metadata import version as package_version

from fastapi import Request, Response
from sqlalchemy.orm import Session

from app.api.deps import charge_rate
from app.core.errors import ServiceError
from app.core.queries import get_owned

SERVICE_VERSION = package_version("modelpress")


def etag_matches(request: Request, etag: str) -> bool:
    """True when the request's If-None-Match lists `etag` (a list of tags, or `*`)."""
    return if_none_match_lists(request.headers.get("if-none-match", ""), etag)


def if_none_match_lists(header: str, etag: str) -> bool:
    tags = [tag.strip() for tag in header.split(",")]
    return etag in tags or "*" in tags


def version_etag(version: int) -> str:
    return f'W/"{SERVICE_VERSION}.{version}"'


def page_etag(rows: list, next_cursor: str | None) -> str:
    """The ETag of a list page: its rows' ids and versions, and where the next page starts."""
    digest = hashlib.sha256(SERVICE_VERSION.encode())
    for row in rows:
        digest.update(f"|{row.id}:{row.version}".encode())
    digest.update(f"|{next_cursor}".encode())
    return f'W/"{digest.hexdigest()[:32]}"'


def owned_or_charge(request: Request, session: Session, table, row_id: str, tenant_id: str, kind: str):
    """For a route of a `ConditionalTenant`: the tenant's row; a miss (404) is charged to the rate like any
    request, so probing for ids is never free."""
    try:
        return get_owned(session, table, row_id, tenant_id, kind)
    except ServiceError:
        charge_rate(request, tenant_id)
        raise


def not_modified_or_charge(request: Request, tenant_id: str, etag: str) -> Response | None:
    """For a route of a `ConditionalTenant`: a 304 with the ETag (free) if If-None-Match names it; else None, once
    the request is charged to the tenant's rate (429 if the bucket is empty)."""
    if etag_matches(request, etag):
        return Response(status_code=304, headers={"ETag": etag})
    charge_rate(request, tenant_id)
    return None
