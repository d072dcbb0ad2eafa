"""/v1/jobs/{id}/events and /v1/events: job events as Server-Sent Events (status, progress, end), from the
job_events table, resumable with `Last-Event-ID`."""

import math
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from sqlalchemy.orm import Session, sessionmaker

from app.api.deps import CurrentTenant, SettingsDep
from app.api.errors import error_responses
from app.api.event_stream import Batch, EventStreamResponse, Source, Window, event_stream, parse_last_event_id, sse
from app.api.params import JobId
from app.api.routes.jobs import job_public
from app.api.schemas import JobPublic
from app.core.config import Settings
from app.core.errors import ErrorCode, ServiceError
from app.core.job_events import EventKind, events_with_jobs, job_events_after
from app.core.job_events import last_event_id as job_last_event_id
from app.core.queries import get_owned, owned
from app.core.statuses import JobStatus
from app.core.tables import Job, JobEvent

router = APIRouter(prefix="/v1", tags=["events"])

# Events read per query; a stream with more to send reads again at once.
PAGE = 500
END = "end"

LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", description=(
    "resume after this event id (sent back by EventSource clients on reconnect)"), examples=["42"])]
_STREAM = {200: {"description": "`text/event-stream`: events `status`, `progress` and (per job) `end`; a `: ping` "
                                "comment every MODELPRESS_EVENT_HEARTBEAT_INTERVAL seconds",
                 "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def summary(job: Job) -> dict[str, Any]:
    """The job as GET /v1/jobs/{id} shows it."""
    return jsonable_encoder(job_public(job))


def summary_at(job: Job, event: JobEvent) -> dict[str, Any]:
    """The job as it was when `event` (a status change) happened: its status then, and the changing fields the
    event recorded (a job is given its metrics and artifacts only when it finishes)."""
    fields = job_public(job).model_dump()
    fields.update(event.data or {}, status=event.to_status)
    if not JobStatus(event.to_status).is_terminal():
        fields.update(metrics=None, artifacts=[])
    return jsonable_encoder(JobPublic.model_validate(fields))


def message(event: JobEvent, job: Job, **extra: Any) -> bytes:
    if event.kind == EventKind.PROGRESS:
        return sse(event.id, EventKind.PROGRESS, {**(event.data or {}), **extra})
    return sse(event.id, EventKind.STATUS, {**summary_at(job, event), **extra})


class JobSource:
    """One job's events; after its final status event, `end` with the job, and the stream closes."""

    def __init__(self, factory: sessionmaker[Session], tenant_id: str, job_id: str):
        self.factory, self.tenant_id, self.job_id = factory, tenant_id, job_id

    def read(self, after: int, upto: int) -> Batch:
        with self.factory() as session:
            job = owned(session, Job, self.job_id, self.tenant_id)
            if job is None:  # deleted while watched: nothing more will come
                return Batch(cursor=after, finished=True)
            events = job_events_after(session, self.job_id, after, upto, PAGE)
            batch = Batch([message(event, job) for event in events], full=len(events) == PAGE,
                          cursor=events[-1].id if len(events) == PAGE else max(after, upto))
            if not batch.full and JobStatus(job.status).is_terminal():
                last = job_last_event_id(session, self.job_id)
                if last <= max(after, upto):  # the final status event was sent (or came before Last-Event-ID)
                    batch.messages.append(sse(last + 1, END, summary(job)))
                    batch.finished = True
            return batch

    def take(self, window: Window) -> Batch:
        batch = Batch(cursor=window.upto)
        for event, job in window.rows:
            if event.job_id != self.job_id:
                continue
            batch.messages.append(window.memo((event.id, "job"), lambda: message(event, job)))
            if event.kind == EventKind.STATUS and JobStatus(event.to_status).is_terminal():  # its last event
                batch.messages.append(window.memo((event.id, END), lambda: sse(event.id + 1, END, summary(job))))
                batch.finished = True
        return batch


class TenantSource:
    """Every event of the tenant's jobs, each with `job_id`."""

    def __init__(self, factory: sessionmaker[Session], tenant_id: str):
        self.factory, self.tenant_id = factory, tenant_id

    def read(self, after: int, upto: int) -> Batch:
        with self.factory() as session:
            rows = events_with_jobs(session, after, upto, PAGE, tenant_id=self.tenant_id)
            return Batch([message(event, job, job_id=job.id) for event, job in rows], full=len(rows) == PAGE,
                         cursor=rows[-1][0].id if len(rows) == PAGE else max(after, upto))

    def take(self, window: Window) -> Batch:
        return Batch([window.memo((event.id, "tenant"), lambda: message(event, job, job_id=job.id))
                      for event, job in window.rows if job.tenant_id == self.tenant_id], cursor=window.upto)


async def _stream(request: Request, tenant_id: str, source: Source, cursor: int | None,
                  settings: Settings) -> EventStreamResponse:
    """Take one of the tenant's stream slots (429 when none is free) and stream from `cursor` (None: from the
    newest settled event, i.e. only what happens from now on)."""
    feed, slots = request.app.state.event_feed, request.app.state.stream_slots
    stream_id = uuid.uuid4().hex
    if slots is not None and not await run_in_threadpool(slots.acquire, tenant_id, stream_id):
        retry = max(1, math.ceil(settings.event_heartbeat_interval))
        raise ServiceError(ErrorCode.TOO_MANY_STREAMS,
                           f"this tenant already has {settings.tenant_max_event_streams} open event streams (the "
                           "limit); close one, or retry after the number of seconds in the Retry-After header",
                           {"Retry-After": str(retry)})

    async def renew() -> None:
        if slots is not None:
            await run_in_threadpool(slots.renew, tenant_id, stream_id)

    async def release() -> None:
        if slots is not None:
            await run_in_threadpool(slots.release, tenant_id, stream_id)

    return EventStreamResponse(event_stream(request, feed, source, cursor, settings.event_heartbeat_interval,
                                            renew), on_close=release)


@router.get("/jobs/{job_id}/events", status_code=200, response_class=EventStreamResponse,
            responses={**_STREAM, **error_responses(400, 404)})
async def job_events(job_id: JobId, request: Request, tenant: CurrentTenant, settings: SettingsDep,
                     last_event_id: LastEventId = None):
    """The job's events from its start (or after `Last-Event-ID`), then live: `status` on every status change
    (data: the job, as GET /v1/jobs/{id} shows it), `progress` (data: stage, step_index, fraction, epoch, trial,
    message), and `end` (data: the job) once it has finished, after which the stream closes."""
    cursor = parse_last_event_id(last_event_id)
    factory = request.app.state.session_factory

    def check_owned() -> None:
        with factory() as session:
            get_owned(session, Job, job_id, tenant.id, "job")

    await run_in_threadpool(check_owned)
    return await _stream(request, tenant.id, JobSource(factory, tenant.id, job_id), cursor or 0, settings)


@router.get("/events", status_code=200, response_class=EventStreamResponse,
            responses={**_STREAM, **error_responses(400)})
async def tenant_events(request: Request, tenant: CurrentTenant, settings: SettingsDep,
                        last_event_id: LastEventId = None):
    """Every job event of the tenant, live (or from after `Last-Event-ID`; `0` replays all): `status` and
    `progress` as on a job's stream, each with `job_id`. Never ends on its own."""
    return await _stream(request, tenant.id, TenantSource(request.app.state.session_factory, tenant.id),
                         parse_last_event_id(last_event_id), settings)
