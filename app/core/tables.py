"""ORM models. The database is the source of truth for tenants, keys, models, datasets, jobs and artifacts."""

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    literal_column,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.core.db import Base, UTCDateTime, utcnow
from app.core.statuses import ModelStatus


def version_column() -> Mapped[int]:
    """The row's version, for ETags: every UPDATE of the row (ORM or Core) adds one, unless the statement sets it
    itself (a heartbeat keeps it: it changes nothing a client sees)."""
    return mapped_column(Integer, default=1, server_default=text("1"), onupdate=literal_column("version + 1"))


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """Only the sha256 of a key is stored; `prefix` finds the row, the hash proves the secret."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Written at most once a minute per key (app.core.auth.touch), not on every request.
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # A key rotated with a grace period keeps working until then.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    tenant: Mapped[Tenant] = relationship(lazy="joined")

    def is_active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class StoredFile:
    """The columns of every uploaded file (models and datasets): who owns it, what it is, where it is stored."""

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Model(StoredFile, Base):
    """An uploaded model; a worker inspects it (`status`, `info`, `error`)."""

    __tablename__ = "models"
    __table_args__ = (Index("ix_models_tenant_id_id", "tenant_id", "id"),)

    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.UPLOADED)
    version: Mapped[int] = version_column()
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    info: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Given at upload (app.core.input_specs): the default input specs of jobs on this model.
    input_specs: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Inspection is sent to a worker like a job: committed first, sent after, re-sent if the send failed.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    inspect_attempts: Mapped[int] = mapped_column(Integer, default=0)


class Dataset(StoredFile, Base):
    """An uploaded dataset, validated at upload; `info` describes its arrays (or its labels, for jsonl)."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_id_id", "tenant_id", "id"),)

    num_samples: Mapped[int] = mapped_column(BigInteger)
    has_labels: Mapped[bool] = mapped_column(Boolean)
    info: Mapped[dict[str, Any]] = mapped_column(JSON)
    version: Mapped[int] = version_column()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_id_id", "tenant_id", "id"),
        Index("ix_jobs_status", "status"),
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # No foreign key: a job's history outlives the deletion of its input model.
    model_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    version: Mapped[int] = version_column()
    recipe: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    tune: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    datasets: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    target: Mapped[dict[str, Any]] = mapped_column(JSON)
    queue: Mapped[str] = mapped_column(String(32))
    webhook_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    min_fidelity: Mapped[float | None] = mapped_column(nullable=True)
    accept_degraded: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The specs the job runs with: the model's, overridden per input by the job's own (app.core.input_specs).
    input_specs: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    progress_fraction: Mapped[float] = mapped_column(default=0.0)
    progress_step: Mapped[str | None] = mapped_column(String(100), nullable=True)
    progress_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When the job's outputs were removed from storage (DELETE /v1/jobs/{id}, or the retention period): the row
    # and its artifact rows stay as history, the files are gone and no longer count against the quota.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    artifacts: Mapped[list["Artifact"]] = relationship(
        back_populates="job", order_by="Artifact.id", cascade="all, delete-orphan", passive_deletes=True
    )


class JobEvent(Base):
    """A job's history, in order: every status change (`kind` "status") and the progress reports worth showing
    (`kind` "progress", throttled by the worker: app.core.job_events). The id orders a job's events and is the
    `id:` of the Server-Sent Events (GET /v1/jobs/{id}/events, /v1/events). On SQLite the id is AUTOINCREMENT, so
    deleting the newest events never hands their ids out again."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16), default="status", server_default="status")
    from_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # The job's status after the event (a progress event: the running job's).
    to_status: Mapped[str] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    # status: the job's changing fields at that moment; progress: the report (app.core.job_events).
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Artifact(Base):
    """A file a job delivers. A provisional one is a running tune job's best trial so far (app.core.jobs): at most
    one per job, replaced by a better trial, and gone (or made final) when the job ends."""

    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    format: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    provisional: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")


class QueueHeartbeat(Base):
    """When some worker last said it serves a queue (app.core.presence): a queue nobody served lately has no
    worker, and its jobs wait for nothing."""

    __tablename__ = "queue_heartbeats"

    queue: Mapped[str] = mapped_column(String(32), primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(200))
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WebhookSecret(Base):
    """A tenant's webhook signing secret (`whsec_...`). After a rotation the previous one keeps signing beside
    the new one until `previous_expires_at`. Stored as is: HMAC needs the secret itself."""

    __tablename__ = "webhook_secrets"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100), nullable=True)
    previous_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WebhookEvent(Base):
    """The webhook outbox: one row per event, written in the transaction of the job's terminal transition and
    sent later by the API's housekeeping (app.core.webhooks). `id` (`msg_...`) is the `webhook-id` of every
    attempt. A sender holds a row while `lease_until` is in the future (`lease_token` says which sender)."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        Index("ix_webhook_events_tenant_id_id", "tenant_id", "id"),
        Index("ix_webhook_events_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    url: Mapped[str] = mapped_column(String(2000))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    lease_token: Mapped[str | None] = mapped_column(String(40), nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    attempt_log: Mapped[list["WebhookAttempt"]] = relationship(
        order_by="WebhookAttempt.id", cascade="all, delete-orphan", passive_deletes=True)


class WebhookAttempt(Base):
    """One try at sending a webhook event: when, the HTTP status (or why there is none), how long it took."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True)
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_ms: Mapped[int] = mapped_column(Integer)
