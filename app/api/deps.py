"""FastAPI dependencies as Annotated aliases: SessionDep, CurrentTenant, SettingsDep, StorageDep, CeleryDep."""

import math
from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from app.api.key_cache import Caller, KeyCache
from app.core import auth
from app.core.config import Settings
from app.core.errors import ErrorCode, ServiceError
from app.core.storage import Storage


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session_factory(request: Request) -> sessionmaker[Session]:
    return request.app.state.session_factory


def get_session(request: Request) -> Iterator[Session]:
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
StorageDep = Annotated[Storage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


# Declares the bearer scheme in the OpenAPI schema (clients, /docs, schema checks see that /v1 needs a key);
# auto_error is off so that a missing key gets the service's own 401 body.
bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer mp_...`")


MISSING_KEY = "missing API key: send 'Authorization: Bearer <key>'"
INVALID_KEY = "invalid or revoked API key"
UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


def refuse_nul_bytes(request: Request) -> None:
    """A NUL in the path is no id of ours (404); in a query parameter it is invalid (422, naming it). PostgreSQL
    text cannot hold NUL, so without this a `%00` became a 500."""
    if "\x00" in request.scope["path"]:
        raise ServiceError(ErrorCode.NOT_FOUND, "not found: no id contains a NUL character")
    for name, value in request.query_params.multi_items():
        if "\x00" in name or "\x00" in value:
            raise ServiceError(ErrorCode.INVALID_REQUEST,
                               f"{name.replace(chr(0), '?') or '(unnamed)'}: must not contain NUL characters")


def charge_rate(request: Request, tenant_id: str) -> None:
    """Take one token of the tenant's request rate, or answer 429 with Retry-After."""
    limiter = request.app.state.rate_limiter
    if limiter is not None:
        wait = limiter.acquire(tenant_id)
        if wait > 0:
            raise ServiceError(ErrorCode.RATE_LIMITED, "too many requests for this tenant; retry after the number of "
                                                       "seconds in the Retry-After header",
                               {"Retry-After": str(max(1, math.ceil(wait)))})


def authenticate(request: Request, session: Session, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    """The caller of the request's key: from the key cache when it was verified a moment ago, else from the
    database (then cached). The key's id is left in `request.state.api_key_id` for routes that depend on it."""
    if credentials is None or not credentials.credentials.strip():
        raise ServiceError(ErrorCode.UNAUTHORIZED, MISSING_KEY, UNAUTHORIZED_HEADERS)
    key = credentials.credentials.strip()
    key_cache: KeyCache = request.app.state.key_cache
    caller = key_cache.lookup(key)
    if caller is None:
        row = auth.authenticate(session, key)
        if row is None:
            raise ServiceError(ErrorCode.UNAUTHORIZED, INVALID_KEY, UNAUTHORIZED_HEADERS)
        auth.touch(session, row)
        caller = Caller(id=row.tenant_id, key_id=row.id)
        key_cache.store(key, caller, row.expires_at)
        # End the read transaction: the request must not sit on a pooled connection while it streams an upload
        # or waits for other work (that exhausted the pool under load and stalled every request).
        session.commit()
    refuse_nul_bytes(request)
    request.state.api_key_id = caller.key_id
    return caller


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def get_current_tenant(request: Request, session: SessionDep, credentials: Credentials) -> Caller:
    """Authenticate, then take one token of the tenant's request rate: every /v1 route is limited."""
    caller = authenticate(request, session, credentials)
    charge_rate(request, caller.id)
    return caller


def get_conditional_tenant(request: Request, session: SessionDep, credentials: Credentials) -> Caller:
    """Authenticate only: a GET that answers `If-None-Match` with 304 is free (as on GitHub's API), so its route
    calls `charge_rate` itself once it knows it sends a body."""
    return authenticate(request, session, credentials)


CurrentTenant = Annotated[Caller, Depends(get_current_tenant)]
ConditionalTenant = Annotated[Caller, Depends(get_conditional_tenant)]
