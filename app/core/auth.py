"""API keys: `mp_<prefix>_<secret>`. Only a sha256 of the whole key is stored; the prefix finds the row."""

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.core.ids import new_id
from app.core.tables import ApiKey, Tenant

KEY_PREFIX = "mp"
# last_used_at is this coarse so that a busy key costs one write a minute, not one per request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def issue_key(session: Session, tenant_id: str, name: str | None = None,
              expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """A new key for a tenant (that stops at `expires_at` if given); the plaintext is returned once, never stored."""
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(id=new_id("key"), tenant_id=tenant_id, prefix=prefix, key_hash=hash_key(key), name=name,
                 expires_at=expires_at)
    session.add(row)
    session.flush()
    return row, key


def create_api_key(session: Session, tenant_name: str, name: str | None = None) -> tuple[Tenant, str]:
    """Create the tenant if needed and a new key for it."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=tenant_name)
        session.add(tenant)
        session.flush()
    _, key = issue_key(session, tenant.id, name)
    return tenant, key


def authenticate(session: Session, key: str) -> ApiKey | None:
    """The key's row if the key is genuine and active (not revoked, not past a rotation's grace period)."""
    parts = key.split("_", 2)
    # The prefix is looked up, so it must be one we could have issued (hex): a NUL would fail on PostgreSQL.
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not (parts[1].isascii() and parts[1].isalnum()):
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
    if row is None or not row.is_active(utcnow()):
        return None
    if not hmac.compare_digest(row.key_hash, hash_key(key)):
        return None
    return row


def touch(session: Session, row: ApiKey) -> None:
    """Record the key's use, at most once a minute; the guarded UPDATE keeps concurrent API processes to one write."""
    now = utcnow()
    stale = now - LAST_USED_RESOLUTION
    if row.last_used_at is not None and row.last_used_at > stale:
        return
    session.execute(update(ApiKey).where(ApiKey.id == row.id)
                    .where(or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= stale))
                    .values(last_used_at=now).execution_options(synchronize_session=False))
    session.commit()
    row.last_used_at = now


def count_active(session: Session, tenant_id: str) -> int:
    """The tenant's keys that work now: not revoked, not past their expiry (keys in a grace period count)."""
    now = utcnow()
    return session.scalar(select(func.count()).select_from(ApiKey).where(
        ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None),
        or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now)))


def revoke(row: ApiKey) -> None:
    """Revoke now; revoking a revoked key keeps its first revocation time."""
    if row.revoked_at is None:
        row.revoked_at = utcnow()


def rotate(session: Session, row: ApiKey, grace_seconds: int) -> tuple[ApiKey, str]:
    """A replacement key (same name); the old key stops at once, or after `grace_seconds` so clients can switch."""
    replacement, key = issue_key(session, row.tenant_id, row.name)
    if grace_seconds == 0:
        revoke(row)
    else:
        until = utcnow() + timedelta(seconds=grace_seconds)
        # A second rotation never extends a grace period already running.
        row.expires_at = until if row.expires_at is None else min(row.expires_at, until)
    return replacement, key
