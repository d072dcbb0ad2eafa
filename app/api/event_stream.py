"""Server-Sent Events from the job_events table: the process's watch on the table, and the stream loop.

The database is the only store: any API replica serves any stream, resuming from `Last-Event-ID`. One watcher per
process (`EventFeed`) polls the newest ids; when they move it reads the new events once, for every stream (a
`Window`), and wakes the streams, which pick theirs out of it. A stream that is behind (replaying, or slow to
send) reads its own events in short sessions. No stream holds a connection while it waits.

Ids of different jobs' events can commit out of order (event 11 visible while 10's transaction is still open).
A stream that sent 11 and moved on would never send 10, so streams only read up to the `settled` id: every id at
or below it is committed, or was missing for `event_gap_wait` seconds and is taken for a rolled-back write.
"""

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import DBAPIError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.core.db import session_scope
from app.core.errors import ErrorCode, ServiceError
from app.core.job_events import event_ids_after, events_with_jobs, newest_event_id
from app.core.tables import Job, JobEvent

log = logging.getLogger(__name__)

# A watcher starting up treats this many of the newest ids as possibly still in flight (holes among them wait).
LOOKBACK_IDS = 200
SCAN_IDS = 1000
# A move of the settled id over more events than this is not read for everyone: each stream reads its own.
WINDOW_EVENTS = 1000
# Windows kept, so a stream a little behind (a slow client) still finds its next one in memory.
WINDOWS_KEPT = 32
PING = b": ping\n\n"
MAX_LAST_EVENT_ID = 2**63 - 1


def sse(event_id: int, kind: str, data: dict[str, Any]) -> bytes:
    """One event: its id, its kind and one line of compact JSON."""
    payload = json.dumps(data, separators=(",", ":"))  # as GET /v1/jobs/{id} writes the job
    return f"id: {event_id}\nevent: {kind}\ndata: {payload}\n\n".encode()


def parse_last_event_id(value: str | None) -> int | None:
    """The `Last-Event-ID` header as an event id, None when absent or empty; 400 when it is not one."""
    value = (value or "").strip()
    if not value:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 19 or int(value) > MAX_LAST_EVENT_ID:
        raise ServiceError(ErrorCode.INVALID_CURSOR, "Last-Event-ID must be the id of an event: a whole number "
                                                     f"from 0 to {MAX_LAST_EVENT_ID}")
    return int(value)


class SettledIds:
    """The highest event id at or below which every id is committed or given up as a hole."""

    def __init__(self, start: int, gap_wait: float):
        self.mark, self.gap_wait = start, gap_wait
        self.holes: dict[int, float] = {}  # missing id -> when it was first seen missing

    def advance(self, ids: list[int], now: float) -> int:
        """Move the mark over `ids` (the committed ids above it, ascending) and over holes older than the wait."""
        present = set(ids)
        top = max(ids, default=self.mark)
        for missing in range(self.mark + 1, top + 1):
            if missing not in present:
                self.holes.setdefault(missing, now)
        for candidate in range(self.mark + 1, top + 1):
            if candidate not in present and now - self.holes[candidate] < self.gap_wait:
                break
            self.mark = candidate
        self.holes = {hole: seen for hole, seen in self.holes.items() if hole > self.mark}
        return self.mark


class Window:
    """The events between two settled ids (`after` < id <= `upto`), of every tenant, each with its job as it was
    read; `memo` keeps what the streams make of an event, so each message is built once per process."""

    def __init__(self, after: int, upto: int, rows: list[tuple[JobEvent, Job]]):
        self.after, self.upto, self.rows = after, upto, rows
        self._made: dict[Any, Any] = {}

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]


class EventFeed:
    """This process's watch on the job_events table: polls the committed ids while any stream is open; when the
    settled id moves, reads the new events once (a `Window`) and wakes the streams."""

    def __init__(self, factory, poll_interval: float, gap_wait: float):
        self.factory, self.poll_interval, self.gap_wait = factory, poll_interval, gap_wait
        self.settled = 0
        self._ids: SettledIds | None = None
        self._windows: deque[Window] = deque(maxlen=WINDOWS_KEPT)
        self._subscribers = 0
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._moved = asyncio.Event()

    def _scan(self) -> tuple[int, Window | None]:
        """The settled id now, and the window of events since the last one published (None: none, or too many)."""
        with session_scope(self.factory) as session:
            if self._ids is None:
                self._ids = SettledIds(max(0, newest_event_id(session) - LOOKBACK_IDS), self.gap_wait)
            while True:
                ids = event_ids_after(session, self._ids.mark, SCAN_IDS)
                before = self._ids.mark
                self._ids.advance(ids, time.monotonic())
                if len(ids) < SCAN_IDS or self._ids.mark == before:
                    break
            settled, published = self._ids.mark, self.settled
            if not self._ready.is_set() or settled <= published:
                return settled, None
            rows = events_with_jobs(session, published, settled, WINDOW_EVENTS + 1)
            return settled, Window(published, settled, rows) if len(rows) <= WINDOW_EVENTS else None

    async def _watch(self) -> None:
        while self._subscribers:
            try:
                settled, window = await run_in_threadpool(self._scan)
            except Exception as exc:  # the database is away: the streams wait, and the next poll tries again
                log.warning("event feed: cannot read job events (%s: %s)", exc.__class__.__name__, exc)
            else:
                if settled != self.settled or not self._ready.is_set():
                    if window is not None:
                        self._windows.append(window)
                    self.settled = settled
                    self._ready.set()
                    moved, self._moved = self._moved, asyncio.Event()
                    moved.set()
            await asyncio.sleep(self.poll_interval)

    def window_after(self, cursor: int) -> Window | None:
        """The kept window that starts right after `cursor`, if any."""
        return next((window for window in self._windows if window.after == cursor), None)

    @asynccontextmanager
    async def subscription(self) -> AsyncIterator[None]:
        """While inside, the feed is watched; the first subscriber waits for the first scan."""
        self._subscribers += 1
        if self._task is None or self._task.done():
            # Start afresh: ids committed while idle are not holes, and old windows may no longer join up.
            self._ids, self._ready = None, asyncio.Event()
            self._windows.clear()
            self._task = asyncio.get_running_loop().create_task(self._watch())
        try:
            await self._ready.wait()
            yield
        finally:
            self._subscribers -= 1

    async def wait_beyond(self, cursor: int, timeout: float) -> None:
        """Return once the settled id passes `cursor`, or after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):  # no task per wait, unlike wait_for: thousands of streams wait
                while self.settled <= cursor:
                    await self._moved.wait()
        except TimeoutError:
            pass


@dataclass
class Batch:
    """What one read of a stream found: the events to send, where the next read starts, whether the stream ends
    after these, and whether a full page was read (read again at once)."""

    messages: list[bytes] = field(default_factory=list)
    cursor: int = 0
    finished: bool = False
    full: bool = False


class Source(Protocol):
    """What one stream sends: `read` its events after `after` up to `upto` from the database (in a thread),
    or `take` them from a window."""

    def read(self, after: int, upto: int) -> Batch: ...

    def take(self, window: Window) -> Batch: ...


async def event_stream(request: Request, feed: EventFeed, source: Source, cursor: int | None, heartbeat: float,
                       renew: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    """Send the source's events after `cursor` (None: after the newest settled event, i.e. only what happens from
    now on): first from the database, then from the feed's windows (from the database again whenever the next
    window is gone), waiting for the feed between them; `: ping` every `heartbeat` seconds. Ends when the source
    says so or the client goes away."""
    async with feed.subscription():
        cursor = feed.settled if cursor is None else cursor
        next_ping = time.monotonic() + heartbeat
        first = True
        while True:
            window = None if first else feed.window_after(cursor)
            if window is not None:
                batch = source.take(window)
            elif first or feed.settled > cursor:
                try:
                    batch = await run_in_threadpool(source.read, cursor, feed.settled)
                except DBAPIError as exc:  # the database is away: keep the client, try again after a wait
                    log.warning("event stream: cannot read job events (%s)", exc.__class__.__name__)
                    batch = Batch(cursor=cursor)
                    await asyncio.sleep(feed.poll_interval)
                else:
                    first = False
            else:
                batch = None
            if batch is not None:
                for message in batch.messages:
                    yield message
                cursor = batch.cursor
                if batch.finished:
                    return
                if batch.full:
                    continue
            await feed.wait_beyond(cursor, max(0.0, next_ping - time.monotonic()))
            if time.monotonic() >= next_ping:
                # Asked at heartbeats only (asking costs a cancelled scope): a client that left is noticed sooner
                # by the server, which cancels the response, or by the next write.
                if await request.is_disconnected():
                    return
                yield PING
                next_ping = time.monotonic() + heartbeat
                await renew()


class EventStreamResponse(StreamingResponse):
    """`text/event-stream`, never cached or buffered by a proxy; `on_close` runs however the response ends (the
    stream's slot is freed even when the client left before the first byte)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.on_close()
