"""Webhooks: an outbox written with the job's terminal transition, signed (Standard Webhooks) and sent to public
addresses only, by the API processes' housekeeping, never by the job's worker.

- Enqueue: `enqueue_job_event` adds a `webhook_events` row (`msg_...`, due now) in the transaction that moves the
  job to succeeded / failed / cancelled (app.core.jobs calls it), so an event exists if and only if the job ended.
- Send: `WebhookSender.send_round` (once per housekeeping round) hands due rows to a small thread pool. A pool
  thread claims one row at a time with a lease (a guarded UPDATE setting `lease_until` and its own
  `lease_token`), so several API replicas never send the same row at once; a row whose sender died is taken
  again once its lease ran out. At most `per_tenant` rows of one tenant are in flight at once, so one tenant's
  slow endpoints cannot hold every slot. Delivery is at least once: receivers dedupe on `webhook-id`.
- Attempt: resolve the host once, refuse any non-public address, connect to that very address (Host header and
  TLS SNI/certificate check use the URL's host: no DNS rebinding), POST, read the status line and headers, all
  within one total deadline (`DEADLINE_S`: a trickling endpoint is cut there, whatever it sends). Redirects are
  never followed (a 3xx fails the attempt); 2xx delivers.
- Retry: the row's `next_attempt_at` holds the schedule: `FIRST_RETRY_S`, then x`BACKOFF_FACTOR` each time, at
  most `MAX_RETRY_S` apart, until `Settings.webhook_retry_hours` after the event; then the row is `failed`.
- Sign: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256("{id}.{ts}.{body}")>`,
  keyed with the tenant's `whsec_` secret; during the 24 h after a rotation the previous secret signs too.
Stdlib only besides SQLAlchemy: the workers import this (through app.core.jobs) too.
"""

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import socket
import ssl
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.db import session_scope, utcnow
from app.core.ids import new_id
from app.core.tables import Job, WebhookAttempt, WebhookEvent, WebhookSecret

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
ROTATION_GRACE = timedelta(hours=24)

DEADLINE_S = 10.0          # one attempt, all of it: DNS, connect, TLS, request, status line and headers
WORKERS = 8                # sending threads per API process
TENANT_IN_FLIGHT = 2       # rows of one tenant being sent at once (per process, approximately across replicas)
SENDS_PER_TASK = 50        # rows one pool task sends before it gives its slot back
LEASE_MARGIN_S = 50.0      # a lease lasts the deadline plus this: ample for the database writes around a send
FIRST_RETRY_S = 4.0        # + up to one housekeeping interval (5 s by default): the first retry within 10 s
BACKOFF_FACTOR = 3.0
MAX_RETRY_S = 3600.0
MAX_RESPONSE_HEAD = 64 * 1024
USER_AGENT = "modelpress-webhooks/1.0"


class WebhookStatus(StrEnum):
    """`pending` (being tried), `delivered` (an attempt got a 2xx) or `failed` (given up)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


EVENT_TYPES = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


# --- the outbox --------------------------------------------------------------------------------------------------

def enqueue_job_event(session: Session, job: Job, status: str, finished_at: datetime, error_code: str | None,
                      error_message: str | None) -> WebhookEvent | None:
    """Add the event of a job's terminal transition to the outbox, in the caller's transaction; None when the job
    has no webhook_url. `job` gives the unchanging fields (id, tenant, model, url); the rest is the new state."""
    if not job.webhook_url:
        return None
    now = utcnow()
    event_type = EVENT_TYPES[str(status)]
    payload = {"type": event_type, "timestamp": _iso(now), "data": {
        "id": job.id, "status": str(status), "model_id": job.model_id, "finished_at": _iso(finished_at),
        "error": {"code": str(error_code), "message": error_message or ""} if error_code else None}}
    event = WebhookEvent(id=new_id("msg"), tenant_id=job.tenant_id, job_id=job.id, type=event_type,
                         payload=payload, url=job.webhook_url, status=WebhookStatus.PENDING, attempts=0,
                         next_attempt_at=now, created_at=now, updated_at=now)
    session.add(event)
    return event


def retry_delay(attempts: int) -> float:
    """Seconds between failed attempt number `attempts` (1 = the first) and the next: 4, 12, 36, 108, 324, 972,
    2916, then 3600 each time."""
    return min(FIRST_RETRY_S * BACKOFF_FACTOR ** max(0, attempts - 1), MAX_RETRY_S)


def next_attempt_at(created_at: datetime, attempts: int, now: datetime, retry_hours: float) -> datetime | None:
    """When to try again after `attempts` failed attempts, or None once that is past the retry window."""
    due = now + timedelta(seconds=retry_delay(attempts))
    return due if due <= created_at + timedelta(hours=retry_hours) else None


@dataclass(frozen=True)
class Claimed:
    """A row this sender holds (its lease), with what sending it needs."""

    id: str
    tenant_id: str
    url: str
    payload: dict[str, Any]
    attempts: int  # counting this one
    created_at: datetime
    token: str


def _free(now: datetime):
    return or_(WebhookEvent.lease_until.is_(None), WebhookEvent.lease_until <= now)


def _due(now: datetime):
    return (WebhookEvent.status == WebhookStatus.PENDING, WebhookEvent.next_attempt_at <= now, _free(now))


def due_ids(session: Session, now: datetime, limit: int) -> list[str]:
    return list(session.scalars(select(WebhookEvent.id).where(*_due(now))
                                .order_by(WebhookEvent.next_attempt_at, WebhookEvent.id).limit(limit)))


def claim_next(session: Session, lease_s: float, per_tenant: int = TENANT_IN_FLIGHT) -> Claimed | None:
    """Take the most overdue free row (of a tenant with fewer than `per_tenant` rows in flight) with a lease of
    `lease_s` seconds; commits. None when nothing is due. The UPDATE's guard makes one claimant win a row."""
    now = utcnow()
    saturated = (select(WebhookEvent.tenant_id)
                 .where(WebhookEvent.status == WebhookStatus.PENDING, WebhookEvent.lease_until > now)
                 .group_by(WebhookEvent.tenant_id).having(func.count() >= per_tenant))
    candidates = session.scalars(
        select(WebhookEvent.id).where(*_due(now), WebhookEvent.tenant_id.not_in(saturated))
        .order_by(WebhookEvent.next_attempt_at, WebhookEvent.id).limit(8)).all()
    token = secrets.token_hex(16)
    for event_id in candidates:
        result = session.execute(
            update(WebhookEvent).where(WebhookEvent.id == event_id, *_due(now))
            .values(lease_until=now + timedelta(seconds=lease_s), lease_token=token,
                    attempts=WebhookEvent.attempts + 1, updated_at=now)
            .execution_options(synchronize_session=False))
        if result.rowcount == 1:
            session.commit()
            row = session.execute(select(WebhookEvent.tenant_id, WebhookEvent.url, WebhookEvent.payload,
                                         WebhookEvent.attempts, WebhookEvent.created_at)
                                  .where(WebhookEvent.id == event_id)).one()
            session.commit()
            return Claimed(event_id, row.tenant_id, row.url, row.payload, row.attempts, row.created_at, token)
    session.commit()
    return None


@dataclass(frozen=True)
class Outcome:
    """One attempt: the HTTP status (None when there was no response), why it failed, how long it took."""

    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def record(session: Session, claimed: Claimed, outcome: Outcome, retry_hours: float) -> str:
    """Write the attempt and the row's new state (delivered, pending with its next due time, or failed); the
    row is only changed while this sender still holds its lease. Returns the new status."""
    now = utcnow()
    if outcome.delivered:
        status, due = WebhookStatus.DELIVERED, None
    else:
        due = next_attempt_at(claimed.created_at, claimed.attempts, now, retry_hours)
        status = WebhookStatus.PENDING if due is not None else WebhookStatus.FAILED
    session.add(WebhookAttempt(event_id=claimed.id, attempted_at=now - timedelta(milliseconds=outcome.duration_ms),
                               status_code=outcome.status_code, error=outcome.error,
                               duration_ms=outcome.duration_ms))
    result = session.execute(
        update(WebhookEvent).where(WebhookEvent.id == claimed.id, WebhookEvent.lease_token == claimed.token)
        .values(status=status, next_attempt_at=due, lease_until=None, lease_token=None,
                last_status_code=outcome.status_code, last_error=outcome.error, updated_at=now,
                delivered_at=now if outcome.delivered else None)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        log.warning("webhook %s: the lease ran out during the attempt; another sender has the row", claimed.id)
    return status


# --- secrets and signing -----------------------------------------------------------------------------------------

def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def get_secret(session: Session, tenant_id: str) -> WebhookSecret:
    """The tenant's secret row, created on first use (INSERT .. ON CONFLICT DO NOTHING: when two requests race,
    both get the row that won)."""
    row = session.get(WebhookSecret, tenant_id)
    if row is not None:
        return row
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(insert(WebhookSecret).values(tenant_id=tenant_id, secret=new_secret(), created_at=utcnow())
                    .on_conflict_do_nothing(index_elements=["tenant_id"]))
    row = session.get(WebhookSecret, tenant_id, populate_existing=True)
    assert row is not None
    return row


def rotate_secret(session: Session, tenant_id: str) -> WebhookSecret:
    """A new current secret; the one it replaces keeps signing for ROTATION_GRACE (a secret older than that
    stops at once). Guarded on the current secret, so two concurrent rotations chain instead of losing one."""
    for _ in range(5):
        row = get_secret(session, tenant_id)
        now = utcnow()
        result = session.execute(
            update(WebhookSecret).where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.secret == row.secret)
            .values(secret=new_secret(), previous_secret=row.secret, previous_expires_at=now + ROTATION_GRACE,
                    rotated_at=now).execution_options(synchronize_session=False))
        session.flush()
        session.refresh(row)
        if result.rowcount == 1:
            return row
    raise RuntimeError("the webhook secret kept changing during rotation")


def signing_secrets(row: WebhookSecret, now: datetime) -> list[str]:
    """The current secret, then the previous one while its grace period lasts."""
    keys = [row.secret]
    if row.previous_secret and row.previous_expires_at is not None and row.previous_expires_at > now:
        keys.append(row.previous_secret)
    return keys


def sign(msg_id: str, timestamp: int, body: bytes, secret_list: list[str]) -> str:
    """The `webhook-signature` header: `v1,<base64 HMAC-SHA256>` per secret, space-separated."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    signatures = []
    for secret in secret_list:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
        signatures.append("v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode())
    return " ".join(signatures)


def event_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


# --- targets -----------------------------------------------------------------------------------------------------

class TargetRefused(ValueError):
    """A webhook URL this service will not send to; the message says why (without the field name)."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# Every form inet_aton takes: 1 to 4 parts, each decimal, octal (leading 0) or hex (0x): 2130706433, 0x7f000001,
# 127.1, 0177.0.0.1. A browser (and pydantic's HttpUrl) reads such a host as an IPv4 address, and so does libc.
_NUMERIC_HOST = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}\.?")
_HOST_CHARS = re.compile(r"[a-z0-9._:%\-]+")


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names literally (dotted, integer, hex, octal IPv4; IPv6 with or without brackets), else
    None (a name to resolve). Raises TargetRefused for a numeric host that is no valid address."""
    host = host.strip("[]").lower()
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
        except OSError:
            raise TargetRefused(f"{host!r} is not a valid IPv4 address") from None
    return None


def address_refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> str | None:
    """Why a webhook may not go to this address, or None when it may. Public (global unicast) addresses only;
    with allow_private, anything but unspecified and multicast. IPv6 forms that carry an IPv4 address (mapped,
    compatible, 6to4, NAT64) are judged by that IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded, form = None, ""
        if address.ipv4_mapped is not None:
            embedded, form = address.ipv4_mapped, "an IPv4-mapped"
        elif address in _IPV4_COMPATIBLE and int(address) > 1:
            embedded, form = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "an IPv4-compatible"
        elif address.sixtofour is not None:
            embedded, form = address.sixtofour, "a 6to4"
        elif address in _NAT64:
            embedded, form = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "a NAT64"
        if embedded is not None:
            inner = address_refusal(embedded, allow_private)
            return f"{form} form of {embedded}, {inner}" if inner else None
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if allow_private:
        return None
    for test, kind in ((address.is_loopback, "a loopback address"), (address.is_link_local, "a link-local address"),
                       (address.is_reserved, "a reserved address"), (address.is_private, "a private address")):
        if test:
            return kind
    if not address.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str          # lowercase, IDNA, IPv6 without brackets
    port: int
    path: str          # path and query, as sent in the request line
    host_header: str
    literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None


def parse_target(url: str) -> Target:
    """Split a webhook URL into what the sender needs; TargetRefused for anything but a plain http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise TargetRefused("only http and https URLs are allowed")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("credentials in the URL are not supported")
    host = parts.hostname or ""
    if not host:
        raise TargetRefused("the URL has no host")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise TargetRefused("the host is not a valid name") from None
    if not _HOST_CHARS.fullmatch(host):
        raise TargetRefused("the host is not a valid name")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if any(ord(c) <= 32 or ord(c) == 127 for c in path):
        raise TargetRefused("the path holds spaces or control characters")
    literal = literal_address(host)
    default = 443 if parts.scheme == "https" else 80
    port = port if port is not None else default
    shown = f"[{host}]" if isinstance(literal, ipaddress.IPv6Address) else host
    return Target(parts.scheme, host, port, path, shown if port == default else f"{shown}:{port}", literal)


def check_submitted_url(url: str, allow_private: bool) -> None:
    """At submission: refuse what is wrong whatever DNS says (scheme, credentials, a literal address that is not
    public, in any of its forms). Names are resolved and checked at every delivery instead."""
    target = parse_target(url)
    if target.literal is not None and (reason := address_refusal(target.literal, allow_private)):
        raise TargetRefused(f"{target.literal} is {reason}; webhooks go to public addresses only")


# --- one attempt -------------------------------------------------------------------------------------------------

class _Failed(Exception):
    pass


def _resolve(host: str, port: int, timeout: float) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """getaddrinfo on a thread, so that a slow resolver cannot take the attempt past its deadline."""
    result: dict[str, Any] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            result["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            result["error"] = exc
        done.set()

    threading.Thread(target=lookup, name="webhook-dns", daemon=True).start()
    if not done.wait(max(timeout, 0.0)):
        raise _Failed("DNS lookup timed out")
    if "error" in result:
        raise _Failed(f"DNS lookup failed: {result['error']}")
    addresses = []
    for info in result["infos"]:
        address = ipaddress.ip_address(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _remaining(end: float) -> float:
    left = end - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _read_status(sock: socket.socket, end: float) -> int:
    """The final status code, once the status line and every header have arrived (1xx responses skipped)."""
    buffer = b""
    while True:
        sock.settimeout(_remaining(end))
        chunk = sock.recv(4096)
        if not chunk:
            raise _Failed("the connection closed before a complete response")
        buffer += chunk
        while b"\r\n\r\n" in buffer:
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            match = re.match(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: |\r|$)", head)
            if match is None:
                raise _Failed("the response is not HTTP/1.x")
            status = int(match.group(1))
            if status >= 200:
                return status
        if len(buffer) > MAX_RESPONSE_HEAD:
            raise _Failed("the response headers are too large")


def post(url: str, body: bytes, headers: dict[str, str], *, deadline_s: float = DEADLINE_S,
         allow_private: bool = False, ssl_context: ssl.SSLContext | None = None) -> Outcome:
    """POST `body` to `url` once: checked address, no redirects, everything within `deadline_s` seconds."""
    start = time.monotonic()
    end = start + deadline_s
    status, error = None, None
    sock: socket.socket | None = None
    try:
        target = parse_target(url)
        addresses = [target.literal] if target.literal is not None else \
            _resolve(target.host, target.port, _remaining(end))
        for address in addresses:  # every address a name has must be allowed, not only the one we would use
            if reason := address_refusal(address, allow_private):
                raise TargetRefused(f"{target.host} resolves to {address}, {reason}")
        connect_errors = []
        for address in addresses:
            connect_to = address.ipv4_mapped if getattr(address, "ipv4_mapped", None) else address
            try:
                sock = socket.create_connection((str(connect_to), target.port), timeout=_remaining(end))
                break
            except TimeoutError:
                raise
            except OSError as exc:
                connect_errors.append(f"{address}: {exc.strerror or exc}")
        if sock is None:
            raise _Failed("connection failed (" + "; ".join(connect_errors) + ")")
        if target.scheme == "https":
            context = ssl_context or ssl.create_default_context()
            sock.settimeout(_remaining(end))
            sock = context.wrap_socket(sock, server_hostname=target.host)
        request = [f"POST {target.path} HTTP/1.1", f"Host: {target.host_header}", f"User-Agent: {USER_AGENT}",
                   "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close",
                   *(f"{name}: {value}" for name, value in headers.items())]
        sock.settimeout(_remaining(end))
        sock.sendall(("\r\n".join(request) + "\r\n\r\n").encode("latin-1") + body)
        status = _read_status(sock, end)
        if 300 <= status < 400:
            error = "redirects are not followed"
        elif not 200 <= status < 300:
            error = f"the endpoint answered HTTP {status}"
    except TargetRefused as exc:
        error = f"target refused: {exc}"
    except TimeoutError:
        error = f"no complete response within {deadline_s:g} s"
    except ssl.SSLError as exc:
        error = f"TLS failed: {exc.reason or exc}"
    except _Failed as exc:
        error = str(exc)
    except OSError as exc:
        error = f"connection failed: {exc.strerror or exc}"
    finally:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
    return Outcome(status, error, int((time.monotonic() - start) * 1000))


# --- the sender --------------------------------------------------------------------------------------------------

class WebhookSender:
    """Sends due outbox rows on a bounded pool. `send_round` never waits for a send: it counts due rows (one
    query) and starts at most as many pool tasks as there are idle threads; each task claims and sends rows one
    by one (up to `sends_per_task`), so a slow endpoint holds one thread for at most `deadline_s`."""

    def __init__(self, factory: sessionmaker[Session], settings: Settings, *, workers: int = WORKERS,
                 deadline_s: float = DEADLINE_S, per_tenant: int = TENANT_IN_FLIGHT,
                 sends_per_task: int = SENDS_PER_TASK, ssl_context: ssl.SSLContext | None = None):
        self.factory, self.settings = factory, settings
        self.workers, self.deadline_s, self.per_tenant = workers, deadline_s, per_tenant
        self.sends_per_task, self.ssl_context = sends_per_task, ssl_context
        self.lease_s = deadline_s + LEASE_MARGIN_S
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="webhook")
        self._lock = threading.Lock()
        self._busy = 0
        self._closed = False

    def send_round(self) -> list[Future]:
        """Start sending what is due; returns the started tasks (each resolves to the number of rows it sent)."""
        with self._lock:
            idle = 0 if self._closed else self.workers - self._busy
        if idle <= 0:
            return []
        with self.factory() as session:
            due = len(due_ids(session, utcnow(), idle))
        futures = []
        for _ in range(due):
            with self._lock:
                self._busy += 1
            future = self._pool.submit(self._drain)
            future.add_done_callback(self._release)
            futures.append(future)
        return futures

    def _release(self, _future: Future) -> None:
        with self._lock:
            self._busy -= 1

    def _drain(self) -> int:
        sent = 0
        while sent < self.sends_per_task and not self._closed:
            try:
                with self.factory() as session:
                    claimed = claim_next(session, self.lease_s, self.per_tenant)
                if claimed is None:
                    break
                self.deliver(claimed)
            except Exception:  # the database went away mid-way: the lease runs out and the row is sent later
                log.exception("webhook sending stopped on an error")
                break
            sent += 1
        return sent

    def deliver(self, claimed: Claimed) -> Outcome:
        """Sign and send one claimed row, then record the attempt."""
        with session_scope(self.factory) as session:
            keys = signing_secrets(get_secret(session, claimed.tenant_id), utcnow())
        body = event_body(claimed.payload)
        timestamp = int(time.time())
        headers = {"webhook-id": claimed.id, "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(claimed.id, timestamp, body, keys)}
        outcome = post(claimed.url, body, headers, deadline_s=self.deadline_s,
                       allow_private=self.settings.webhook_allow_private, ssl_context=self.ssl_context)
        with session_scope(self.factory) as session:
            status = record(session, claimed, outcome, self.settings.webhook_retry_hours)
        level = logging.INFO if outcome.delivered else logging.WARNING
        log.log(level, "webhook %s attempt %d: %s (%s, %d ms)", claimed.id, claimed.attempts, status,
                outcome.status_code or outcome.error, outcome.duration_ms)
        return outcome

    def close(self, wait: bool = False) -> None:
        """Stop taking rows; sends in flight end within their deadline (a row cut short is sent again later)."""
        self._closed = True
        self._pool.shutdown(wait=wait, cancel_futures=True)
