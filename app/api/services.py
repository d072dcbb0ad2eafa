"""What the API does for a tenant, apart from HTTP: record an upload, submit a job, delete a job's outputs.
Routes parse the request and shape the answer; these decide and write. They are synchronous: routes run them off
the event loop."""

import hashlib
import json
from datetime import timedelta
from pathlib import Path

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.api.limits import check_active_jobs, check_storage_quota
from app.api.schemas import JobCreate
from app.api.uploads import UploadedFile
from app.core import input_specs, jobs, presence, webhooks
from app.core.config import Settings
from app.core.db import utcnow
from app.core.dispatch import dispatch_inspection, dispatch_job
from app.core.errors import ErrorCode, ServiceError
from app.core.ids import new_id
from app.core.model_limits import check_recipe_for_info
from app.core.queries import job_datasets, job_students, owned
from app.core.recipe import check_recipe_for_model, with_encoder_defaults
from app.core.statuses import ModelStatus
from app.core.storage import Storage
from app.core.storage import keys as storage_keys
from app.core.tables import Dataset, Job, Model
from app.core.vetting.dataset_files import DatasetFacts

IDEMPOTENCY_WINDOW = timedelta(hours=24)


def _store(factory: sessionmaker[Session], storage: Storage, row: Model | Dataset, path: Path,
           settings: Settings) -> None:
    """Store the file, then insert its row with the tenant's quota checked in the same transaction (two uploads
    cannot both take the last free bytes). On failure the stored object goes too: nothing is left without a row."""
    storage.put_file(row.storage_key, path)
    try:
        with factory() as session:
            check_storage_quota(session, row.tenant_id, row.size_bytes, settings.tenant_max_storage_bytes)
            session.add(row)
            session.commit()
    except Exception:
        storage.delete(row.storage_key)
        raise


def add_model(factory: sessionmaker[Session], storage: Storage, celery: Celery, settings: Settings,
              tenant_id: str, file: UploadedFile, name: str, fmt: str, extension: str,
              specs: dict[str, input_specs.InputSpec] | None = None) -> Model:
    """Record a vetted model upload (with its default input specs) and send it to a worker for inspection."""
    model_id = new_id("mdl")
    model = Model(id=model_id, tenant_id=tenant_id, name=name, format=fmt, size_bytes=file.size,
                  sha256=file.sha256, storage_key=storage_keys.model_key(tenant_id, model_id, extension),
                  status=ModelStatus.UPLOADED, input_specs=input_specs.to_json(specs))
    _store(factory, storage, model, file.path, settings)
    dispatch_inspection(factory, celery, model.id)
    return model


def add_dataset(factory: sessionmaker[Session], storage: Storage, settings: Settings, tenant_id: str,
                file: UploadedFile, name: str, facts: DatasetFacts) -> Dataset:
    """Record a validated dataset upload."""
    dataset_id = new_id("ds")
    dataset = Dataset(id=dataset_id, tenant_id=tenant_id, name=name, format=facts.format, size_bytes=file.size,
                      sha256=file.sha256, storage_key=storage_keys.dataset_key(tenant_id, dataset_id, facts.format),
                      num_samples=facts.num_samples, has_labels=facts.has_labels, info=facts.info)
    _store(factory, storage, dataset, file.path, settings)
    return dataset


def _request_hash(body: JobCreate) -> str:
    """`dry_run` is left out: it never reaches a stored job, and hashes of jobs stored before it existed hold."""
    return hashlib.sha256(json.dumps(body.model_dump(mode="json", exclude={"dry_run"}), sort_keys=True)
                          .encode()).hexdigest()


def _replay(session: Session, tenant_id: str, key: str, request_hash: str) -> Job | None:
    """The job an earlier request with this key created, if still within the window; 409 if the body differs."""
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    if job is None:
        return None
    if job.created_at < utcnow() - IDEMPOTENCY_WINDOW:
        session.execute(update(Job).where(Job.id == job.id).values(idempotency_key=None))
        session.commit()
        return None
    if job.request_hash != request_hash:
        raise ServiceError(ErrorCode.IDEMPOTENCY_KEY_REUSED,
                           "this Idempotency-Key was used with a different request body")
    return job


def _check_references(session: Session, tenant_id: str, body: JobCreate) -> Model:
    """The job's model, students and datasets must be the tenant's own, and usable; returns the model."""
    model = owned(session, Model, body.model_id, tenant_id)
    if model is None:
        raise ServiceError(ErrorCode.NOT_FOUND, f"model_id: model {body.model_id!r} not found")
    if model.status == ModelStatus.INVALID:
        raise ServiceError(ErrorCode.MODEL_INVALID, f"model_id: model {model.id!r} is invalid: {model.error}")
    try:
        for recipe in body.candidates():
            check_recipe_for_model(recipe, body.target, model.format)
            check_recipe_for_info(recipe, body.target, model.format, model.info)
    except ValueError as exc:
        raise ServiceError(ErrorCode.INVALID_REQUEST, str(exc)) from None
    for field, student_id, student in job_students(session, tenant_id, body.candidates()):
        if student is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"{field}: model {student_id!r} not found")
        if student.status == ModelStatus.INVALID or student.format == "onnx":
            raise ServiceError(ErrorCode.INVALID_REQUEST, f"{field}: the student must be a valid .pt2 or Hugging "
                                                          f"Face model (model {student_id!r} is {student.format}, "
                                                          f"{student.status})")
    for role, dataset_id, dataset in job_datasets(session, tenant_id, body.datasets):
        if dataset is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"datasets.{role}: dataset {dataset_id!r} not found")
    return model


def _job_input_specs(model: Model, body: JobCreate) -> dict | None:
    """The specs the job runs with: the model's, overridden per input by the job's; checked against the model's
    inputs once inspection described them (otherwise the worker checks them)."""
    specs = input_specs.merged(model.input_specs, input_specs.to_json(body.input_specs))
    inputs = (model.info or {}).get("inputs")
    if specs and isinstance(inputs, list):
        problems = input_specs.problems_against_model(input_specs.from_json(specs), inputs)
        if problems:
            raise ServiceError(ErrorCode.INVALID_REQUEST, "; ".join(problems[:5]))
    return specs


def check_submission(session: Session, settings: Settings, tenant_id: str, body: JobCreate, *,
                     lock: bool = True) -> tuple[Model, dict | None]:
    """What a submission checks before it writes anything: the webhook target, the model, students and datasets,
    the input specs, the tenant's job limit; fills a Hugging Face encoder's distill defaults into the recipe.
    Returns the model and the job's input specs; raises the error a refused submission answers (a dry run answers
    the same, without locking the tenant's row)."""
    if body.webhook_url is not None:
        try:
            webhooks.check_submitted_url(str(body.webhook_url), settings.webhook_allow_private)
        except webhooks.TargetRefused as exc:
            raise ServiceError(ErrorCode.INVALID_REQUEST, f"webhook_url: {exc}") from None
    model = _check_references(session, tenant_id, body)
    if body.recipe is not None:
        train = next((d for role, _, d in job_datasets(session, tenant_id, body.datasets) if role == "train"), None)
        body.recipe = with_encoder_defaults(body.recipe, model.format, None if train is None else train.has_labels)
    specs = _job_input_specs(model, body)
    check_active_jobs(session, tenant_id, settings.tenant_max_active_jobs, lock=lock)
    return model, specs


def submit_job(session: Session, factory: sessionmaker[Session], celery: Celery, settings: Settings,
               tenant_id: str, body: JobCreate, idempotency_key: str | None) -> tuple[Job, bool]:
    """Create the job (committed `queued`), then send it. Returns (job, replayed): with an `Idempotency-Key`
    seen within 24 h the first job comes back instead, and is never refused by the tenant's job limit."""
    request_hash = _request_hash(body)
    if idempotency_key:
        existing = _replay(session, tenant_id, idempotency_key, request_hash)
        if existing is not None:
            return existing, True
    model, specs = check_submission(session, settings, tenant_id, body)
    queue = body.target.queue
    alive_after = utcnow() - timedelta(seconds=settings.heartbeat_timeout)
    unserved = presence.unserved(presence.last_served(session), alive_after)
    try:
        job = jobs.create_job(
            session, tenant_id=tenant_id, model_id=model.id, name=body.name,
            recipe=body.recipe.model_dump(mode="json") if body.recipe else None,
            tune=body.tune.model_dump(mode="json") if body.tune else None,
            datasets=body.datasets.model_dump(mode="json"),
            target=body.target.model_dump(mode="json"), queue=queue,
            progress_message=jobs.waiting_message(queue) if queue in unserved else None,
            webhook_url=str(body.webhook_url) if body.webhook_url else None,
            min_fidelity=body.min_fidelity, accept_degraded=body.accept_degraded, input_specs=specs,
            idempotency_key=idempotency_key, request_hash=request_hash)
        session.commit()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        existing = _replay(session, tenant_id, idempotency_key or "", request_hash)
        if existing is None:
            raise
        return existing, True
    dispatch_job(factory, celery, job.id, job.queue)
    session.refresh(job)
    return job, False


def delete_job_outputs(session: Session, storage: Storage, job: Job) -> bool:
    """Remove a finished job's files from storage, then mark the job deleted (the caller commits). Files first: if
    storage fails, nothing is marked and a retry does it all again. False if the job was already marked."""
    storage.delete_prefix(storage_keys.job_prefix(job.tenant_id, job.id))
    return jobs.mark_deleted(session, job.id)
