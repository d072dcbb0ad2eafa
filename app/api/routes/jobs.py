"""/v1/jobs: submit (with idempotency keys), list, get (ETag / 304), cancel, delete (its outputs), report, artifacts,
webhook deliveries."""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from app.api import plans, services
from app.api.conditional import not_modified_or_charge, owned_or_charge, page_etag, version_etag
from app.api.deps import (
    CeleryDep,
    ConditionalTenant,
    CurrentTenant,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
    StorageDep,
)
from app.api.errors import error_responses
from app.api.pagination import page, paginate
from app.api.params import Cursor, JobId, Limit
from app.api.response_cache import ResponseCache
from app.api.routes.webhooks import job_deliveries
from app.api.schemas import (
    ArtifactsPublic,
    JobCreate,
    JobPlan,
    JobPublic,
    JobsPublic,
    JobWebhookDeliveriesPublic,
)
from app.core import jobs
from app.core.errors import ErrorCode, ServiceError
from app.core.queries import get_owned
from app.core.statuses import JobStatus
from app.core.tables import Artifact, Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def live_artifacts(job: Job) -> list[Artifact]:
    """What can be downloaded: nothing once the job's outputs were deleted."""
    return [] if job.deleted_at else job.artifacts


def job_public(job: Job) -> JobPublic:
    return JobPublic(
        id=job.id, name=job.name, model_id=job.model_id, status=job.status, recipe=job.recipe, tune=job.tune,
        datasets=job.datasets, target=job.target, webhook_url=job.webhook_url, min_fidelity=job.min_fidelity,
        accept_degraded=job.accept_degraded, input_specs=job.input_specs,
        progress={"fraction": job.progress_fraction, "step": job.progress_step, "message": job.progress_message},
        error={"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
        metrics=job.metrics, artifacts=live_artifacts(job), attempts=job.attempts,
        cancel_requested=job.cancel_requested, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at, deleted_at=job.deleted_at)


def get_owned_job(session, tenant, job_id: str) -> Job:
    return get_owned(session, Job, job_id, tenant.id, "job")


@router.post("", status_code=201, response_model=JobPublic, responses={
    200: {"model": JobPlan, "description": "`dry_run`: the job's plan; nothing was created"},
    **error_responses(400, 404, 409)})
def create_job(body: JobCreate, tenant: CurrentTenant, session: SessionDep,
                     session_factory: SessionFactoryDep, celery: CeleryDep, settings: SettingsDep,
                     idempotency_key: Annotated[str | None, Header(
                         max_length=200, description="the same key and body within 24 h return the first job "
                                                     "instead of creating another (a different body: 409)",
                         examples=["8d3f0c2e-build-1432"])] = None) -> JSONResponse:
    """Submit a job: 201 with the job, committed `queued` and sent to a worker (or, for a replayed
    `Idempotency-Key`, the first job it created, with `Idempotent-Replayed: true`).

    With `"dry_run": true`: 200 with the plan (the recipe resolved, a tune job's candidates, the datasets matched
    to the model's inputs, the queue and whether a worker serves it, warnings) and nothing created; a job that
    would be refused gets the same error. A dry run ignores `Idempotency-Key`."""
    if body.dry_run:
        plan = plans.plan_job(session, settings, tenant.id, body)
        return JSONResponse(jsonable_encoder(plan), status_code=200)
    job, replayed = services.submit_job(session, session_factory, celery, settings, tenant.id, body,
                                        idempotency_key)
    return JSONResponse(jsonable_encoder(job_public(job)), status_code=201,
                        headers={"Idempotent-Replayed": "true"} if replayed else None)


@router.get("", response_model=JobsPublic, responses={304: {"description": "not modified"}, **error_responses(400)})
def list_jobs(request: Request, tenant: ConditionalTenant, session: SessionDep, limit: Limit = 50,
              cursor: Cursor = None,
              status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
              model_id: Annotated[str | None, Query(description="only the jobs of this model",
                                                    examples=["mdl_0193a1b2c3d4e5f60718293a"])] = None) -> Response:
    """The tenant's jobs, newest first. Sends an ETag (the page's ids and versions): a poller that sends it back in
    If-None-Match gets a body-less 304, not charged to the rate limit, until a job on the page changes."""
    query = select(Job.id, Job.version).where(Job.tenant_id == tenant.id)
    if status:
        query = query.where(Job.status == status.value)
    if model_id:
        query = query.where(Job.model_id == model_id)
    versions, next_cursor = page(session.execute(paginate(query, Job.id, limit, cursor)).all(), limit)
    etag = page_etag(versions, next_cursor)
    if (not_modified := not_modified_or_charge(request, tenant.id, etag)) is not None:
        return not_modified
    bodies = job_bodies(request.app.state.response_cache, session, tenant.id, versions)
    # JobsPublic as pydantic writes it (compact JSON), from the jobs' bodies as GET /v1/jobs/{id} sends them
    body = b'{"data":[' + b",".join(bodies) + b'],"next_cursor":' + json.dumps(next_cursor).encode() + b"}"
    return Response(body, media_type="application/json", headers={"ETag": etag})


def job_bodies(cache: ResponseCache, session, tenant_id: str, versions) -> list[bytes]:
    """The JSON bodies of the jobs at these (id, version) rows, in order: from the response cache, the missing
    ones built (and cached) from one read."""
    bodies = {row.id: cache.get(row.id, tenant_id, row.version) for row in versions}
    missing = [job_id for job_id, body in bodies.items() if body is None]
    if missing:
        for job in session.scalars(select(Job).where(Job.id.in_(missing)).options(selectinload(Job.artifacts))):
            bodies[job.id] = job_body(cache, job)
    return [bodies[row.id] for row in versions]


def job_body(cache: ResponseCache, job: Job) -> bytes:
    """The job's JSON body, kept in the response cache for its version."""
    body = job_public(job).model_dump_json().encode()
    cache.put(job.id, job.tenant_id, job.version, body)
    return body


@router.get("/{job_id}", response_model=JobPublic,
            responses={304: {"description": "not modified"}, **error_responses(404)})
def get_job(job_id: JobId, request: Request, tenant: ConditionalTenant, session: SessionDep) -> Response:
    """Sends an ETag (the job's version); a poller that sends it back in If-None-Match gets a body-less 304, not
    charged to the rate limit, until the job changes."""
    job = owned_or_charge(request, session, Job, job_id, tenant.id, "job")
    etag = version_etag(job.version)
    if (not_modified := not_modified_or_charge(request, tenant.id, etag)) is not None:
        return not_modified
    return Response(job_body(request.app.state.response_cache, job), media_type="application/json",
                    headers={"ETag": etag})


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic, responses=error_responses(404, 409))
def cancel_job(job_id: JobId, tenant: CurrentTenant, session: SessionDep) -> JobPublic:
    """Cancel a job: a queued job ends `cancelled` at once, a running one at its next check
    (`cancel_requested` meanwhile); 409 `job_finished` for a job that already ended."""
    job = get_owned_job(session, tenant, job_id)
    if not jobs.request_cancel(session, job):
        raise ServiceError(ErrorCode.JOB_FINISHED, f"job {job_id!r} already finished with status {job.status!r}")
    session.commit()
    session.refresh(job)
    return job_public(job)


@router.delete("/{job_id}", status_code=204, response_class=Response, responses=error_responses(404, 409))
def delete_job(job_id: JobId, tenant: CurrentTenant, session: SessionDep, storage: StorageDep) -> Response:
    """Delete a finished job's outputs from storage (freeing the tenant's quota); the job stays, with `deleted_at`
    and no artifacts. 204, again for a job already deleted; 409 `job_active` while it is queued or running."""
    job = get_owned_job(session, tenant, job_id)
    if not JobStatus(job.status).is_terminal():
        raise ServiceError(ErrorCode.JOB_ACTIVE, f"job {job_id!r} is {job.status}; cancel it first "
                                                 f"(POST /v1/jobs/{job_id}/cancel) and delete it once it has ended")
    services.delete_job_outputs(session, storage, job)
    session.commit()
    return Response(status_code=204)


@router.get("/{job_id}/report", responses={200: {"description": "the report (free-form JSON: docs/api.md, "
                                                                  "Metrics)"}, **error_responses(404)})
def get_report(job_id: JobId, tenant: CurrentTenant, session: SessionDep) -> dict[str, Any]:
    """The job's metrics: sizes, latency, fidelity, accuracy and each step before and after; 404 until the job
    has one."""
    job = get_owned_job(session, tenant, job_id)
    if not job.metrics:
        raise ServiceError(ErrorCode.NOT_FOUND, f"job {job_id!r} has no report yet (status {job.status!r})")
    return job.metrics


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic, responses=error_responses(404))
def list_artifacts(job_id: JobId, tenant: CurrentTenant, session: SessionDep) -> dict:
    """The files the job produced: the model (and extra exports) and the report."""
    return {"data": live_artifacts(get_owned_job(session, tenant, job_id))}


@router.get("/{job_id}/webhook-deliveries", response_model=JobWebhookDeliveriesPublic, responses=error_responses(404))
def list_webhook_deliveries(job_id: JobId, tenant: CurrentTenant, session: SessionDep) -> JobWebhookDeliveriesPublic:
    """The job's webhook event (none without a `webhook_url`, or before it finished) with its attempts."""
    job = get_owned_job(session, tenant, job_id)
    return JobWebhookDeliveriesPublic(data=job_deliveries(session, tenant.id, job.id))
