"""The one Settings object. Everything is configured by MODELPRESS_* environment variables."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", extra="ignore")

    home: Path = Field(default=Path("./.modelpress"), description="Where embedded defaults keep their data.")
    database_url: str | None = None
    broker_url: str | None = None
    storage_url: str | None = None
    max_upload_bytes: int = 2 * 1024**3

    # Jobs: time limits (seconds), retries after a worker died, heartbeat and reaper timings.
    job_soft_time_limit: int = 3600
    job_time_limit: int = 3660
    job_max_attempts: int = 3
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 60.0
    dispatch_interval: float = 5.0
    dispatch_retry_after: float = 10.0
    # A job still queued this long after its message went out is sent again: the broker may have lost it.
    redispatch_after: float = 600.0
    # Partial uploads and storage objects that no database row refers to (left by a killed process) are removed
    # by the API's housekeeping once they are this old (seconds); younger ones may still be in flight.
    orphan_age: float = Field(default=3600.0, gt=0)
    # A job queued this long (seconds) while no worker serves its queue (say a `cuda` job and no GPU worker) fails
    # with `no_worker`; until then its progress message says what it waits for (app.core.presence).
    queue_timeout: float = Field(default=3600.0, gt=0)
    # The outputs of jobs finished longer ago than this many days are deleted, as by DELETE /v1/jobs/{id}
    # (unset: kept until deleted).
    artifact_retention_days: float | None = Field(default=None, gt=0)

    # Per-tenant limits; 0 means unlimited. The rate is a token bucket: bursts of up to this many requests,
    # refilled at this many per minute, shared by all API processes through Redis when the broker is Redis.
    tenant_requests_per_minute: int = Field(default=1200, ge=0)
    tenant_max_active_jobs: int = Field(default=100, ge=0, description="queued + running jobs of one tenant")
    tenant_max_storage_bytes: int = Field(default=100 * 1024**3, ge=0,
                                          description="models + datasets + artifacts of one tenant")
    tenant_max_keys: int = Field(default=20, ge=0, description="active API keys of one tenant")
    tenant_max_event_streams: int = Field(default=20, ge=0, description="open Server-Sent Events streams of one "
                                                                        "tenant, over all API processes")

    # Server-Sent Events (GET /v1/jobs/{id}/events, /v1/events): how often an API process looks for new events in
    # the database, how often an idle stream sends a `: ping` comment, and how long a hole in the event ids (an
    # event committed after a later one) holds the streams back before it is taken for a rolled-back write.
    event_poll_interval: float = Field(default=0.5, gt=0)
    event_heartbeat_interval: float = Field(default=15.0, gt=0)
    event_gap_wait: float = Field(default=2.0, ge=0)

    # Polling: a verified API key is trusted this long (seconds) without asking the database again, so a key
    # revoked through another API process or the CLI still works for up to this long (0: every request asks);
    # job bodies kept to answer unchanged polls without rebuilding them (bytes per API process, 0: off).
    auth_cache_seconds: float = Field(default=10.0, ge=0)
    response_cache_bytes: int = Field(default=32 * 1024**2, ge=0)

    # Request bodies other than uploads (JSON) are refused past this size (413), before they are parsed.
    max_json_bytes: int = Field(default=1024 * 1024, gt=0)
    # GET /metrics needs `Authorization: Bearer <token>` when set.
    metrics_token: str | None = None

    # Webhooks: delivered from the API processes' housekeeping, retried with backoff for this long.
    webhook_retry_hours: float = Field(default=24.0, gt=0)
    # Private, loopback and link-local targets are refused unless this is set (tests, private deployments).
    webhook_allow_private: bool = False

    # The sandbox that parses and runs uploaded files: its resident-memory cap in bytes (default: a share of the
    # machine's memory per worker slot, see worker.sandbox).
    worker_memory_bytes: int | None = Field(default=None, gt=0)
    # Job slots of this worker process's Celery worker (`modelpress worker --concurrency`): memory is shared by them.
    worker_concurrency: int = Field(default=1, ge=1)
    # Tests only: make a stage fail on purpose, "<stage>:<fault>" (see worker.sandbox_child.inject_fault).
    fault_injection: str | None = None

    # Measurement: latency runs per model after warm-up, threads for ONNX Runtime.
    latency_runs: int = 50
    latency_warmup: int = 5
    eval_threads: int = 1

    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    def resolved_database_url(self) -> str:
        """SQLite under MODELPRESS_HOME by default; plain postgresql:// URLs use the psycopg 3 driver."""
        url = self.database_url or f"sqlite:///{self.resolved_home() / 'modelpress.db'}"
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                return "postgresql+psycopg://" + url[len(plain):]
        return url

    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.resolved_home() / "artifacts").as_uri()

    def broker_folder(self) -> Path:
        """Mailbox folder for Celery's filesystem transport (embedded mode)."""
        return self.resolved_home() / "broker"

    def upload_tmp_dir(self) -> Path:
        return self.resolved_home() / "tmp"


@lru_cache
def get_settings() -> Settings:
    return Settings()
