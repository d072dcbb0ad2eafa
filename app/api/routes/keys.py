"""/v1/keys: a tenant lists, creates, revokes and rotates its own API keys."""

from typing import Annotated

from fastapi import APIRouter, Body, Request
from sqlalchemy import select

from app.api.deps import CurrentTenant, SessionDep, SettingsDep
from app.api.errors import error_responses
from app.api.key_cache import Caller
from app.api.limits import lock_tenant
from app.api.pagination import page, paginate
from app.api.params import Cursor, KeyId, Limit
from app.api.schemas import KeyCreate, KeyCreated, KeyPublic, KeyRotate, KeysPublic
from app.core import auth
from app.core.db import utcnow
from app.core.errors import ErrorCode, ServiceError
from app.core.queries import get_owned
from app.core.tables import ApiKey

router = APIRouter(prefix="/v1/keys", tags=["keys"])


def key_public(row: ApiKey) -> KeyPublic:
    return KeyPublic(id=row.id, prefix=row.prefix, name=row.name, created_at=row.created_at,
                     last_used_at=row.last_used_at, revoked_at=row.revoked_at, expires_at=row.expires_at,
                     active=row.is_active(utcnow()))


def key_created(row: ApiKey, key: str) -> KeyCreated:
    return KeyCreated(**key_public(row).model_dump(), key=key)


def get_owned_key(session, tenant: Caller, key_id: str) -> ApiKey:
    return get_owned(session, ApiKey, key_id, tenant.id, "key")


def refuse_expiring_caller(request: Request, session) -> None:
    """409 `key_expiring` unless the request's own key is open-ended. A key with an expiry (one in a rotation's
    grace period, or created with `expires_at`) that could mint keys would outlive its expiry through them."""
    caller = session.get(ApiKey, request.state.api_key_id)
    if caller is None or caller.expires_at is not None:
        raise ServiceError(ErrorCode.KEY_EXPIRING,
                           "this request's key has an expiry (it is in a rotation's grace period or was created "
                           "with expires_at): only a key without expiry can create, rotate or revoke keys")


def check_key_limit(session, tenant_id: str, limit: int, adding: int, hint: str = "revoke one first") -> None:
    """429 `too_many_keys` if `adding` more active keys would take the tenant past `limit` (0: no limit). Locks the
    tenant row until commit, so concurrent creations cannot both take the last place."""
    if limit == 0 or adding <= 0:
        return
    lock_tenant(session, tenant_id)
    active = auth.count_active(session, tenant_id)
    if active + adding > limit:
        raise ServiceError(ErrorCode.TOO_MANY_KEYS,
                           f"this tenant has {active} active keys (the limit is {limit}); {hint}")


@router.get("", response_model=KeysPublic, responses=error_responses(400))
def list_keys(tenant: CurrentTenant, session: SessionDep, limit: Limit = 50, cursor: Cursor = None) -> KeysPublic:
    """The tenant's keys, revoked ones included; never a secret or a hash."""
    query = select(ApiKey).where(ApiKey.tenant_id == tenant.id)
    rows, next_cursor = page(session.scalars(paginate(query, ApiKey.id, limit, cursor)).all(), limit)
    return KeysPublic(data=[key_public(r) for r in rows], next_cursor=next_cursor)


@router.post("", status_code=201, response_model=KeyCreated, responses=error_responses(400, 409))
def create_key(request: Request, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep,
               body: Annotated[KeyCreate | None, Body(description="optional: a label and an expiry")] = None,
               ) -> KeyCreated:
    """A new key for the caller's tenant (up to `MODELPRESS_TENANT_MAX_KEYS` active keys, else 429); `key` is
    shown in this response only. Only a key without expiry may create keys."""
    refuse_expiring_caller(request, session)
    check_key_limit(session, tenant.id, settings.tenant_max_keys, adding=1)
    row, key = auth.issue_key(session, tenant.id, body.name if body else None, body.expires_at if body else None)
    session.commit()
    return key_created(row, key)


@router.post("/{key_id}/revoke", response_model=KeyPublic, responses=error_responses(404, 409))
def revoke_key(key_id: KeyId, request: Request, tenant: CurrentTenant, session: SessionDep) -> KeyPublic:
    """The key answers 401 from now on; revoking the key of this very request is allowed. Only a key without
    expiry may revoke keys."""
    refuse_expiring_caller(request, session)
    row = get_owned_key(session, tenant, key_id)
    auth.revoke(row)
    session.commit()
    request.app.state.key_cache.clear()  # this process stops the key now; others within the cache's TTL
    return key_public(row)


@router.post("/{key_id}/rotate", status_code=201, response_model=KeyCreated,
             responses=error_responses(400, 404, 409))
def rotate_key(key_id: KeyId, request: Request, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep,
               body: Annotated[KeyRotate | None, Body(description="optional: a grace period")] = None) -> KeyCreated:
    """A replacement key, shown once; the old key stops at once, or after `grace_seconds` (both work until then).
    Only a key without expiry may rotate keys; with a grace period the replacement counts against the limit."""
    refuse_expiring_caller(request, session)
    row = get_owned_key(session, tenant, key_id)
    if not row.is_active(utcnow()):
        raise ServiceError(ErrorCode.KEY_INACTIVE, f"key {key_id!r} is revoked or expired; create a new key instead")
    grace = body.grace_seconds if body else 0
    # Without grace the old key is revoked as the new one is made; with grace both are active for a while.
    check_key_limit(session, tenant.id, settings.tenant_max_keys, adding=1 if grace else 0,
                    hint="rotate with grace_seconds 0 (the old key stops at once) or revoke a key first")
    replacement, key = auth.rotate(session, row, grace)
    session.commit()
    request.app.state.key_cache.clear()
    return key_created(replacement, key)
