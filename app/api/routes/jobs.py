"""/v1/jobs: submit (with idempotency keys), list, get (ETag / 304), cancel, report, artifacts."""

import hashlib
import json
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from app.api.deps import (
    CeleryDep,
    CurrentTenant,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
)
from app.api.errors import error_responses
from app.api.housekeeping import dispatch_job
from app.api.limits import check_active_jobs
from app.api.pagination import MAX_LIMIT, page, paginate
from app.api.schemas import ArtifactsPublic, JobCreate, JobPublic, JobsPublic
from app.core import jobs
from app.core.db import utcnow
from app.core.errors import ErrorCode, ServiceError
from app.core.queries import get_owned
from app.core.recipe import check_recipe_for_model
from app.core.tables import Dataset, Job, Model

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IDEMPOTENCY_WINDOW = timedelta(hours=24)


def job_public(job: Job) -> JobPublic:
    return JobPublic(
        id=job.id, name=job.name, model_id=job.model_id, status=job.status, recipe=job.recipe, tune=job.tune,
        datasets=job.datasets, target=job.target, webhook_url=job.webhook_url,
        progress={"fraction": job.progress_fraction, "step": job.progress_step, "message": job.progress_message},
        error={"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
        metrics=job.metrics, artifacts=job.artifacts, attempts=job.attempts,
        cancel_requested=job.cancel_requested, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at)


def get_owned_job(session, tenant, job_id: str) -> Job:
    return get_owned(session, Job, job_id, tenant.id, "job")


def _request_hash(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _replay(session, tenant_id: str, key: str, request_hash: str) -> Job | None:
    """The job an earlier request with this key created, if still within the window; 409 if the body differs."""
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    if job is None:
        return None
    if job.created_at < utcnow() - IDEMPOTENCY_WINDOW:
        session.execute(update(Job).where(Job.id == job.id).values(idempotency_key=None))
        session.commit()
        return None
    if job.request_hash != request_hash:
        raise ServiceError(ErrorCode.IDEMPOTENCY_KEY_REUSED, "this Idempotency-Key was used with a different request body")
    return job


def _check_students(session, tenant, body: JobCreate) -> None:
    """An uploaded student must be one of the tenant's models, and usable."""
    for recipe in body.candidates():
        for index, step in enumerate(recipe.steps):
            student_id = getattr(getattr(step, "student", None), "model_id", None)
            if student_id is None:
                continue
            student = session.get(Model, student_id)
            field = f"recipe.steps.{index}.student.model_id"
            if student is None or student.tenant_id != tenant.id:
                raise ServiceError(ErrorCode.NOT_FOUND, f"{field}: model {student_id!r} not found")
            if student.status == "invalid" or student.format == "onnx":
                raise ServiceError(ErrorCode.INVALID_REQUEST, f"{field}: the student must be a valid .pt2 or Hugging Face "
                                                       f"model (model {student_id!r} is {student.format}, "
                                                       f"{student.status})")


@router.post("", status_code=201, response_model=JobPublic, responses=error_responses(400, 404, 409))
def create_job(body: JobCreate, tenant: CurrentTenant, session: SessionDep,
                     session_factory: SessionFactoryDep, celery: CeleryDep, settings: SettingsDep,
                     idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JSONResponse:
    request_hash = _request_hash(body)
    if idempotency_key:
        existing = _replay(session, tenant.id, idempotency_key, request_hash)
        if existing is not None:
            return JSONResponse(jsonable_encoder(job_public(existing)), status_code=201,
                                headers={"Idempotent-Replayed": "true"})
    model = session.get(Model, body.model_id)
    if model is None or model.tenant_id != tenant.id:
        raise ServiceError(ErrorCode.NOT_FOUND, f"model_id: model {body.model_id!r} not found")
    if model.status == "invalid":
        raise ServiceError(ErrorCode.MODEL_INVALID, f"model_id: model {model.id!r} is invalid: {model.error}")
    try:
        for recipe in body.candidates():
            check_recipe_for_model(recipe, body.target, model.format)
    except ValueError as exc:
        raise ServiceError(ErrorCode.INVALID_REQUEST, str(exc)) from None
    _check_students(session, tenant, body)
    for role, dataset_id in body.datasets.model_dump().items():
        if dataset_id is None:
            continue
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.tenant_id != tenant.id:
            raise ServiceError(ErrorCode.NOT_FOUND, f"datasets.{role}: dataset {dataset_id!r} not found")
    check_active_jobs(session, tenant.id, settings.tenant_max_active_jobs)  # a replay above is never refused
    try:
        job = jobs.create_job(
            session, tenant_id=tenant.id, model_id=model.id, name=body.name,
            recipe=body.recipe.model_dump(mode="json") if body.recipe else None,
            tune=body.tune.model_dump(mode="json") if body.tune else None,
            datasets=body.datasets.model_dump(mode="json"),
            target=body.target.model_dump(mode="json"), queue=body.target.queue,
            webhook_url=str(body.webhook_url) if body.webhook_url else None,
            idempotency_key=idempotency_key, request_hash=request_hash)
        session.commit()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        existing = _replay(session, tenant.id, idempotency_key or "", request_hash)
        if existing is None:
            raise
        return JSONResponse(jsonable_encoder(job_public(existing)), status_code=201,
                            headers={"Idempotent-Replayed": "true"})
    dispatch_job(session_factory, celery, job.id, job.queue)
    session.refresh(job)
    return JSONResponse(jsonable_encoder(job_public(job)), status_code=201)


@router.get("", response_model=JobsPublic, responses=error_responses(400))
def list_jobs(tenant: CurrentTenant, session: SessionDep,
              limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50, cursor: str | None = None,
              status: jobs.JobStatus | None = None, model_id: str | None = None) -> JobsPublic:
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status:
        query = query.where(Job.status == status.value)
    if model_id:
        query = query.where(Job.model_id == model_id)
    rows, next_cursor = page(session.scalars(paginate(query, Job.id, limit, cursor)).all(), limit)
    return JobsPublic(data=[job_public(j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic,
            responses={304: {"description": "not modified"}, **error_responses(404)})
def get_job(job_id: str, request: Request, tenant: CurrentTenant, session: SessionDep) -> Response:
    """Sends an ETag; a poller that sends it back in If-None-Match gets a body-less 304 until the job changes."""
    body = json.dumps(jsonable_encoder(job_public(get_owned_job(session, tenant, job_id))),
                      separators=(",", ":")).encode()
    etag = f'W/"{hashlib.sha256(body).hexdigest()[:32]}"'
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    return Response(body, media_type="application/json", headers={"ETag": etag})


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic, responses=error_responses(404, 409))
def cancel_job(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobPublic:
    job = get_owned_job(session, tenant, job_id)
    if not jobs.request_cancel(session, job):
        raise ServiceError(ErrorCode.JOB_FINISHED, f"job {job_id!r} already finished with status {job.status!r}")
    session.commit()
    session.refresh(job)
    return job_public(job)


@router.get("/{job_id}/report", responses=error_responses(404))
def get_report(job_id: str, tenant: CurrentTenant, session: SessionDep) -> dict:
    job = get_owned_job(session, tenant, job_id)
    if not job.metrics:
        raise ServiceError(ErrorCode.NOT_FOUND, f"job {job_id!r} has no report yet (status {job.status!r})")
    return job.metrics


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic, responses=error_responses(404))
def list_artifacts(job_id: str, tenant: CurrentTenant, session: SessionDep) -> dict:
    return {"data": get_owned_job(session, tenant, job_id).artifacts}
