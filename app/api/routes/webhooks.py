"""/v1/webhooks: the tenant's signing secret (read, rotate) and its webhook deliveries."""

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from app.api.deps import CurrentTenant, SessionDep
from app.api.errors import error_responses
from app.api.pagination import page, paginate
from app.api.params import Cursor, Limit
from app.api.schemas import WebhookAttemptPublic, WebhookDeliveriesPublic, WebhookDeliveryPublic, WebhookSecretPublic
from app.core import webhooks
from app.core.db import utcnow
from app.core.tables import WebhookEvent, WebhookSecret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


def secret_public(row: WebhookSecret) -> WebhookSecretPublic:
    expires = row.previous_expires_at if row.previous_secret and row.previous_expires_at else None
    return WebhookSecretPublic(secret=row.secret, previous_expires_at=expires if expires and expires > utcnow()
                               else None)


def delivery_public(event: WebhookEvent) -> WebhookDeliveryPublic:
    return WebhookDeliveryPublic(
        id=event.id, type=event.type, job_id=event.job_id, url=event.url, status=event.status,
        attempt_count=event.attempts, next_attempt_at=event.next_attempt_at, last_status_code=event.last_status_code,
        last_error=event.last_error, created_at=event.created_at, delivered_at=event.delivered_at,
        attempts=[WebhookAttemptPublic(attempted_at=a.attempted_at, status_code=a.status_code, error=a.error,
                                       duration_ms=a.duration_ms) for a in event.attempt_log])


def job_deliveries(session: Session, tenant_id: str, job_id: str) -> list[WebhookDeliveryPublic]:
    """A job's events, oldest first (the caller has checked the job is the tenant's)."""
    rows = session.scalars(select(WebhookEvent).where(WebhookEvent.tenant_id == tenant_id,
                                                      WebhookEvent.job_id == job_id)
                           .options(selectinload(WebhookEvent.attempt_log)).order_by(WebhookEvent.id)).all()
    return [delivery_public(r) for r in rows]


@router.get("/secret", response_model=WebhookSecretPublic)
def get_secret(tenant: CurrentTenant, session: SessionDep) -> WebhookSecretPublic:
    """The secret that signs the tenant's webhooks (created on first use). Verify `webhook-signature` with it."""
    row = webhooks.get_secret(session, tenant.id)
    session.commit()
    return secret_public(row)


@router.post("/secret/rotate", response_model=WebhookSecretPublic)
def rotate_secret(tenant: CurrentTenant, session: SessionDep) -> WebhookSecretPublic:
    """A new secret; the one it replaces keeps signing beside it (two `v1,` signatures) for 24 h."""
    row = webhooks.rotate_secret(session, tenant.id)
    session.commit()
    return secret_public(row)


@router.get("/deliveries", response_model=WebhookDeliveriesPublic, responses=error_responses(400))
def list_deliveries(tenant: CurrentTenant, session: SessionDep, limit: Limit = 50, cursor: Cursor = None,
                    status: Annotated[webhooks.WebhookStatus | None,
                                      Query(description="only events in this delivery status")] = None,
                    ) -> WebhookDeliveriesPublic:
    """The tenant's webhook events, newest first, each with its attempts."""
    query = select(WebhookEvent).where(WebhookEvent.tenant_id == tenant.id) \
        .options(selectinload(WebhookEvent.attempt_log))
    if status:
        query = query.where(WebhookEvent.status == status.value)
    rows, next_cursor = page(session.scalars(paginate(query, WebhookEvent.id, limit, cursor)).all(), limit)
    return WebhookDeliveriesPublic(data=[delivery_public(r) for r in rows], next_cursor=next_cursor)
