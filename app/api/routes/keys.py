"""/v1/keys: a tenant lists, creates, revokes and rotates its own API keys."""

from typing import Annotated

from fastapi import APIRouter, Body, Query
from sqlalchemy import select

from app.api.deps import CurrentTenant, SessionDep
from app.api.errors import error_responses
from app.api.pagination import MAX_LIMIT, page, paginate
from app.api.schemas import KeyCreate, KeyCreated, KeyPublic, KeyRotate, KeysPublic
from app.core import auth
from app.core.db import utcnow
from app.core.errors import ErrorCode, ServiceError
from app.core.queries import get_owned
from app.core.tables import ApiKey, Tenant

router = APIRouter(prefix="/v1/keys", tags=["keys"])


def key_public(row: ApiKey) -> KeyPublic:
    return KeyPublic(id=row.id, prefix=row.prefix, name=row.name, created_at=row.created_at,
                     last_used_at=row.last_used_at, revoked_at=row.revoked_at, expires_at=row.expires_at,
                     active=row.is_active(utcnow()))


def key_created(row: ApiKey, key: str) -> KeyCreated:
    return KeyCreated(**key_public(row).model_dump(), key=key)


def get_owned_key(session, tenant: Tenant, key_id: str) -> ApiKey:
    return get_owned(session, ApiKey, key_id, tenant.id, "key")


@router.get("", response_model=KeysPublic, responses=error_responses(400))
def list_keys(tenant: CurrentTenant, session: SessionDep,
              limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50, cursor: str | None = None) -> KeysPublic:
    """The tenant's keys, revoked ones included; never a secret or a hash."""
    query = select(ApiKey).where(ApiKey.tenant_id == tenant.id)
    rows, next_cursor = page(session.scalars(paginate(query, ApiKey.id, limit, cursor)).all(), limit)
    return KeysPublic(data=[key_public(r) for r in rows], next_cursor=next_cursor)


@router.post("", status_code=201, response_model=KeyCreated, responses=error_responses(400))
def create_key(tenant: CurrentTenant, session: SessionDep,
               body: Annotated[KeyCreate | None, Body()] = None) -> KeyCreated:
    """A new key for the caller's tenant; `key` is shown in this response only."""
    row, key = auth.issue_key(session, tenant.id, body.name if body else None)
    session.commit()
    return key_created(row, key)


@router.post("/{key_id}/revoke", response_model=KeyPublic, responses=error_responses(404))
def revoke_key(key_id: str, tenant: CurrentTenant, session: SessionDep) -> KeyPublic:
    """The key answers 401 from now on; revoking the key of this very request is allowed."""
    row = get_owned_key(session, tenant, key_id)
    auth.revoke(row)
    session.commit()
    return key_public(row)


@router.post("/{key_id}/rotate", status_code=201, response_model=KeyCreated,
             responses=error_responses(400, 404, 409))
def rotate_key(key_id: str, tenant: CurrentTenant, session: SessionDep,
               body: Annotated[KeyRotate | None, Body()] = None) -> KeyCreated:
    """A replacement key, shown once; the old key stops at once, or after `grace_seconds` (both work until then)."""
    row = get_owned_key(session, tenant, key_id)
    if not row.is_active(utcnow()):
        raise ServiceError(ErrorCode.KEY_INACTIVE, f"key {key_id!r} is revoked or expired; create a new key instead")
    replacement, key = auth.rotate(session, row, body.grace_seconds if body else 0)
    session.commit()
    return key_created(replacement, key)
