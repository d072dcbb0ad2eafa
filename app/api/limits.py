"""Per-tenant limits: request rate (token bucket), queued + running jobs, stored bytes, open event streams.
0 in Settings = unlimited.

The rate limiter sits behind one small interface, `RateLimiter.acquire`. With a Redis broker the
buckets live in that Redis (a Lua script, so every API process shares them and the refill uses Redis's clock);
with the embedded filesystem broker they are small files under MODELPRESS_HOME/limits, locked with flock, so the
API processes of one machine (`modelpress serve --workers N`) share them. Event stream slots (`StreamSlots`)
are shared the same way.
"""

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

import redis
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.api.uploads import ParsedUpload, receive_upload
from app.core.config import Settings
from app.core.errors import ErrorCode, ServiceError
from app.core.statuses import ACTIVE
from app.core.tables import Artifact, Dataset, Job, Model, Tenant

log = logging.getLogger(__name__)

# After a Redis error the limiter lets requests through without asking Redis for this long: an outage costs
# one log line and one failed call per period, not a timeout on every request.
REDIS_OUTAGE_BACKOFF = 5.0


class RateLimiter(Protocol):
    def acquire(self, tenant_id: str) -> float:
        """Take one token: 0 if the request may go ahead, else the seconds until a token is back."""
        ...


@contextmanager
def _locked(path: Path) -> Iterator[BinaryIO]:
    """The file at `path`, created if missing, held under an exclusive flock."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        yield handle


class FileRateLimiter:
    """Token buckets as files (`<tenant>.bucket`: tokens and wall-clock time), shared by the API processes of one
    machine (embedded mode)."""

    def __init__(self, folder: Path, per_minute: int):
        self.folder = folder
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        folder.mkdir(parents=True, exist_ok=True)

    def acquire(self, tenant_id: str) -> float:
        # tenant ids are ours (`ten_` and hex), never a path
        with _locked(self.folder / f"{tenant_id}.bucket") as handle:
            now = time.time()
            try:
                tokens, at = (float(part) for part in handle.read().split())
            except ValueError:  # new (empty) or torn: a full bucket
                tokens, at = self.capacity, now
            tokens = min(self.capacity, tokens + max(0.0, now - at) * self.rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self.rate
            handle.truncate(0)
            handle.write(f"{tokens!r} {now!r}".encode())
            return wait


# KEYS[1]: the tenant's bucket; ARGV[1]: capacity; ARGV[2]: tokens per second. Returns the wait as a string
# (Redis would truncate a Lua number to an integer).
_TOKEN_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisRateLimiter:
    """Token buckets in the broker's Redis, shared by every API process. Fails open when Redis is down."""

    def __init__(self, url: str, per_minute: int):
        self.capacity = per_minute
        self.rate = per_minute / 60.0
        self.client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        self.script = self.client.register_script(_TOKEN_BUCKET)
        self._skip_until = 0.0

    def acquire(self, tenant_id: str) -> float:
        if time.monotonic() < self._skip_until:
            return 0.0
        try:
            return float(self.script(keys=[f"modelpress:ratelimit:{tenant_id}"], args=[self.capacity, self.rate]))
        except redis.RedisError as exc:
            self._skip_until = time.monotonic() + REDIS_OUTAGE_BACKOFF
            log.warning("rate limiter: Redis unavailable (%s: %s); letting requests through unlimited for %.0f s",
                        exc.__class__.__name__, exc, REDIS_OUTAGE_BACKOFF)
            return 0.0


def make_rate_limiter(settings: Settings) -> RateLimiter | None:
    """None when rate limiting is off (`tenant_requests_per_minute` 0)."""
    per_minute = settings.tenant_requests_per_minute
    if per_minute == 0:
        return None
    broker_url = settings.resolved_broker_url()
    if broker_url.startswith(("redis://", "rediss://")):
        return RedisRateLimiter(broker_url, per_minute)
    return FileRateLimiter(settings.resolved_home() / "limits" / "rate", per_minute)


class StreamSlots(Protocol):
    """Open Server-Sent Events streams per tenant. A stream takes a slot before its first byte and frees it when
    it ends; `renew` (at every heartbeat) keeps a shared slot alive, so a crashed process's slots run out."""

    def acquire(self, tenant_id: str, stream_id: str) -> bool: ...

    def renew(self, tenant_id: str, stream_id: str) -> None: ...

    def release(self, tenant_id: str, stream_id: str) -> None: ...


class FileStreamSlots:
    """Slots as lease files (`<tenant>/<stream>`, renewed by touching them), shared by the API processes of one
    machine (embedded mode); a lease not renewed for `lease_seconds` (its process died) is free again."""

    def __init__(self, folder: Path, limit: int, lease_seconds: float):
        self.folder, self.limit, self.lease_seconds = folder, limit, lease_seconds
        folder.mkdir(parents=True, exist_ok=True)

    def acquire(self, tenant_id: str, stream_id: str) -> bool:
        streams = self.folder / tenant_id
        streams.mkdir(exist_ok=True)
        with _locked(self.folder / f"{tenant_id}.lock"):
            now = time.time()
            held = 0
            for lease in streams.iterdir():
                try:
                    if now - lease.stat().st_mtime > self.lease_seconds:
                        lease.unlink()
                    else:
                        held += 1
                except FileNotFoundError:
                    pass
            mine = streams / stream_id
            if not mine.exists() and held >= self.limit:
                return False
            mine.touch()
            return True

    def renew(self, tenant_id: str, stream_id: str) -> None:
        (self.folder / tenant_id / stream_id).touch()

    def release(self, tenant_id: str, stream_id: str) -> None:
        (self.folder / tenant_id / stream_id).unlink(missing_ok=True)


# KEYS[1]: the tenant's open streams (a sorted set: stream id -> lease end in ms); ARGV: limit, stream id, lease
# in ms. Expired leases go first; a stream already holding a slot renews it whatever the count. 1 = held.
_STREAM_SLOT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class RedisStreamSlots:
    """Slots as leases in the broker's Redis, shared by every API process. Fails open when Redis is down."""

    def __init__(self, url: str, limit: int, lease_seconds: float):
        self.limit, self.lease_ms = limit, int(lease_seconds * 1000)
        self.client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        self.script = self.client.register_script(_STREAM_SLOT)
        self._skip_until = 0.0

    @staticmethod
    def _key(tenant_id: str) -> str:
        return f"modelpress:streams:{tenant_id}"

    def _unavailable(self, exc: redis.RedisError) -> None:
        self._skip_until = time.monotonic() + REDIS_OUTAGE_BACKOFF
        log.warning("stream slots: Redis unavailable (%s: %s); streams unlimited for %.0f s",
                    exc.__class__.__name__, exc, REDIS_OUTAGE_BACKOFF)

    def acquire(self, tenant_id: str, stream_id: str) -> bool:
        if time.monotonic() < self._skip_until:
            return True
        try:
            return self.script(keys=[self._key(tenant_id)], args=[self.limit, stream_id, self.lease_ms]) == 1
        except redis.RedisError as exc:
            self._unavailable(exc)
            return True

    def renew(self, tenant_id: str, stream_id: str) -> None:
        self.acquire(tenant_id, stream_id)

    def release(self, tenant_id: str, stream_id: str) -> None:
        try:
            self.client.zrem(self._key(tenant_id), stream_id)
        except redis.RedisError as exc:
            self._unavailable(exc)


def make_stream_slots(settings: Settings) -> StreamSlots | None:
    """None when streams are unlimited (`tenant_max_event_streams` 0). A shared slot's lease outlives three
    heartbeats, so only a stream that stopped renewing (its process died) loses it."""
    limit = settings.tenant_max_event_streams
    if limit == 0:
        return None
    lease = 3 * settings.event_heartbeat_interval + 5
    broker_url = settings.resolved_broker_url()
    if broker_url.startswith(("redis://", "rediss://")):
        return RedisStreamSlots(broker_url, limit, lease)
    return FileStreamSlots(settings.resolved_home() / "limits" / "streams", limit, lease)


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise one tenant's check-then-insert until commit (FOR UPDATE on PostgreSQL; SQLite has one writer)."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())


def check_active_jobs(session: Session, tenant_id: str, limit: int, *, lock: bool = True) -> None:
    """429 `too_many_jobs` when the tenant already has `limit` queued or running jobs. Locks the tenant row (a dry
    run, which adds no job, only counts)."""
    if limit == 0:
        return
    if lock:
        lock_tenant(session, tenant_id)
    active = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.in_(ACTIVE)))
    if active >= limit:
        raise ServiceError(ErrorCode.TOO_MANY_JOBS,
                           f"this tenant already has {active} queued or running jobs (the limit "
                           f"is {limit}); wait for one to finish or cancel one")


def storage_used(session: Session, tenant_id: str) -> int:
    """Bytes the tenant stores: its models, datasets and the artifacts of jobs whose outputs were not deleted."""
    files = sum(session.scalar(select(func.coalesce(func.sum(table.size_bytes), 0))
                               .where(table.tenant_id == tenant_id))
                for table in (Model, Dataset))
    artifacts = session.scalar(select(func.coalesce(func.sum(Artifact.size_bytes), 0))
                               .join(Job, Job.id == Artifact.job_id)
                               .where(Artifact.tenant_id == tenant_id, Job.deleted_at.is_(None)))
    return files + artifacts


def _quota_exceeded(used: int, quota: int) -> ServiceError:
    return ServiceError(ErrorCode.QUOTA_EXCEEDED,
                        f"this upload would take the tenant's stored bytes past its quota of "
                        f"{quota} bytes ({used} stored); delete models, datasets or finished jobs' outputs "
                        "to make room")


def check_storage_quota(session: Session, tenant_id: str, adding: int, quota: int) -> None:
    """413 `quota_exceeded` unless `adding` more bytes fit. Locks the tenant row, so call it in the insert's
    transaction: two concurrent uploads cannot both take the last free bytes."""
    if quota == 0:
        return
    lock_tenant(session, tenant_id)
    used = storage_used(session, tenant_id)
    if used + adding > quota:
        raise _quota_exceeded(used, quota)


def _used(factory: sessionmaker[Session], tenant_id: str) -> int:
    with factory() as session:
        return storage_used(session, tenant_id)


async def receive_upload_within_quota(request: Request, factory: sessionmaker[Session], tenant_id: str,
                                      settings: Settings, text_fields: set[str]) -> ParsedUpload:
    """Stream an upload, stopping at the smaller of the upload limit and what is left of the tenant's quota.

    A declared Content-Length past what is left is refused before any byte is read, a body without one as soon
    as it passes; the route checks the real size again in the transaction that records the upload.
    """
    quota = settings.tenant_max_storage_bytes
    if quota == 0:
        return await receive_upload(request, settings.upload_tmp_dir(), settings.max_upload_bytes, text_fields)
    used = await run_in_threadpool(_used, factory, tenant_id)
    remaining = quota - used
    if remaining <= 0:
        raise _quota_exceeded(used, quota)
    try:
        return await receive_upload(request, settings.upload_tmp_dir(), min(settings.max_upload_bytes, remaining),
                                    text_fields)
    except ServiceError as exc:
        if exc.code == ErrorCode.TOO_LARGE and remaining < settings.max_upload_bytes:
            raise _quota_exceeded(used, quota) from None
        raise
