"""Celery tasks. They take ids, read everything else from the database, and record every outcome there.

Re-delivery is safe: `jobs.claim` lets only one worker run a job, outputs go to fixed keys per job, and
`jobs.finish` replaces the job's artifact rows instead of adding to them.
"""

import hashlib
import json
import logging
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update

from app.core import jobs
from app.core.config import get_settings
from app.core.db import session_scope, utcnow
from app.core.errors import ErrorCode
from app.core.queue import TaskName
from app.core.recipe import Recipe, Target, TuneSpec
from app.core.tables import Dataset, Job, Model
from worker import resources
from worker.context import JobContext, with_db_retry
from worker.errors import JobCancelled, JobFailure, JobLost

log = logging.getLogger(__name__)
_settings = get_settings()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _workdir(prefix: str) -> Path:
    root = resources.settings().resolved_home() / "work"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


@shared_task(name=TaskName.INSPECT_MODEL, soft_time_limit=_settings.job_soft_time_limit, time_limit=_settings.job_time_limit)
def inspect_model(model_id: str) -> None:
    """Open an uploaded model safely and set it `ready` (with its description) or `invalid` (with why)."""
    from worker import formats

    settings, factory, storage = resources.settings(), resources.session_factory(), resources.storage()

    def start(session):
        model = session.get(Model, model_id)
        if model is None or model.status != "uploaded":
            return None
        # A killed worker's message comes straight back (task_reject_on_worker_lost): without this bound, a model
        # that kills whoever loads it (out of memory) would be inspected again as fast as it kills.
        if model.inspect_attempts >= settings.job_max_attempts:
            model.status = "invalid"
            model.error = f"the worker inspecting this model died {model.inspect_attempts} times; giving up"
            return None
        model.inspect_attempts += 1
        return model.storage_key, model.format

    claimed = with_db_retry(factory, start)
    if claimed is None:
        return
    key, fmt = claimed
    workdir = _workdir("inspect-")
    try:
        local = workdir / f"model.{fmt}"
        storage.get_file(key, local)
        info, status, error = formats.inspect(local, fmt, workdir), "ready", None
    except JobFailure as exc:
        info, status, error = None, "invalid", exc.message
    except SoftTimeLimitExceeded:
        info, status, error = None, "invalid", "inspection took longer than the time limit"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    with_db_retry(factory, lambda s: s.execute(
        update(Model).where(Model.id == model_id, Model.status == "uploaded")
        .values(status=status, info=info, error=error)))
    log.info("model %s inspected: %s %s", model_id, status, error or "")


@shared_task(name=TaskName.RUN_JOB, soft_time_limit=_settings.job_soft_time_limit, time_limit=_settings.job_time_limit)
def run_job(job_id: str) -> None:
    settings, factory, storage = resources.settings(), resources.session_factory(), resources.storage()
    worker_id = resources.worker_id()
    job = with_db_retry(factory, lambda s: jobs.claim(s, job_id, worker_id,
                                                      jobs.stale_cutoff(settings.heartbeat_timeout)))
    if job is None:
        log.info("job %s is not runnable here (finished, cancelled or alive elsewhere); dropping message", job_id)
        return
    outcome: dict = {"status": jobs.JobStatus.FAILED}
    workdir = _workdir(f"{job_id}-")
    try:
        with JobContext(factory, job_id, worker_id, settings.heartbeat_interval) as ctx:
            try:
                outcome = _run(job, workdir, settings, storage, factory, ctx)
            except JobCancelled:
                outcome = {"status": jobs.JobStatus.CANCELLED, "error_code": ErrorCode.CANCELLED,
                           "error_message": "cancelled by the user"}
            except JobFailure as exc:
                outcome = {"status": jobs.JobStatus.FAILED, "error_code": exc.code, "error_message": exc.message}
            except SoftTimeLimitExceeded:
                outcome = {"status": jobs.JobStatus.FAILED, "error_code": ErrorCode.TIMEOUT,
                           "error_message": f"the job ran past its time limit of {settings.job_soft_time_limit}s"}
            except JobLost:
                log.warning("job %s was taken over by another worker; stopping", job_id)
                return
            except Exception as exc:  # a bug or an unexpected library error: record it, never lose the job
                log.exception("job %s failed unexpectedly", job_id)
                outcome = {"status": jobs.JobStatus.FAILED, "error_code": ErrorCode.INTERNAL_ERROR,
                           "error_message": f"{exc.__class__.__name__}: {str(exc)[:500]}"}
        finished = with_db_retry(factory, lambda s: jobs.finish(s, job_id, worker_id, **outcome))
        if finished:
            _notify_webhook(job, outcome["status"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(job: Job, workdir: Path, settings, storage, factory, ctx: JobContext) -> dict:
    from worker.pipeline.runner import Pipeline

    device = job.target.get("device", "cpu")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise JobFailure(ErrorCode.CUDA_UNAVAILABLE, "the job targets cuda but this worker has no CUDA device; "
                                                 "it must run on a GPU worker (queue 'gpu')")
    with session_scope(factory) as session:
        model = session.get(Model, job.model_id)
        if model is None:
            raise JobFailure(ErrorCode.MODEL_MISSING, f"model {job.model_id!r} was deleted")
        if model.status == "invalid":
            raise JobFailure(ErrorCode.MODEL_INVALID, f"model {model.id} is invalid: {model.error}")
        model_key, model_format, model_name = model.storage_key, model.format, model.name
        datasets = {}
        for role, dataset_id in (job.datasets or {}).items():
            if not dataset_id:
                continue
            dataset = session.get(Dataset, dataset_id)
            if dataset is None or dataset.tenant_id != job.tenant_id:
                raise JobFailure(ErrorCode.DATASET_MISSING, f"{role} dataset {dataset_id!r} was deleted")
            datasets[role] = (dataset.storage_key, dataset.format)
        recipe = Recipe.model_validate(job.recipe) if job.recipe else None
        tune = TuneSpec.model_validate(job.tune) if job.tune else None
        students = {}
        for candidate in ([recipe] if recipe else []) + list(tune.search or [] if tune else []):
            for step in candidate.steps:
                student_id = getattr(getattr(step, "student", None), "model_id", None)
                if student_id:
                    student = session.get(Model, student_id)
                    if student is None or student.tenant_id != job.tenant_id:
                        raise JobFailure(ErrorCode.MODEL_MISSING, f"student model {student_id!r} was deleted")
                    students[student_id] = (student.storage_key, student.format)
    local = workdir / f"input.{model_format}"
    storage.get_file(model_key, local)
    dataset_files = {}
    for role, (key, fmt) in datasets.items():
        dataset_files[role] = (workdir / f"{role}.{fmt}", fmt)
        storage.get_file(key, dataset_files[role][0])
    student_files = {}
    for student_id, (key, fmt) in students.items():
        student_files[student_id] = (workdir / f"student-{student_id}.{fmt}", fmt)
        storage.get_file(key, student_files[student_id][0])
    # Training stops in time for the steps after it to finish within the job's soft time limit.
    deadline = time.monotonic() + 0.8 * settings.job_soft_time_limit
    result = Pipeline(recipe, Target.model_validate(job.target), local, model_format, dataset_files, workdir,
                      settings, ctx, tune=tune, student_files=student_files, deadline=deadline).run()
    ctx.progress(0.95, "upload", "storing artifacts")
    metrics = {**result.metrics, "job_id": job.id, "model_id": job.model_id}
    report = workdir / "report.json"
    report.write_text(json.dumps(metrics, indent=2))
    stem = Path(model_name).stem or "model"
    prefix = f"tenants/{job.tenant_id}/jobs/{job.id}"
    artifacts = []
    files = [(o.kind, o.format, o.path, f"{stem}-{o.filename}") for o in result.outputs]
    for kind, fmt, path, filename in [*files, ("report", "json", report, "report.json")]:
        key = f"{prefix}/{filename}"  # fixed per job: a re-run overwrites, never duplicates
        storage.put_file(key, path)
        artifacts.append({"kind": kind, "format": fmt, "filename": filename, "size_bytes": path.stat().st_size,
                          "sha256": _sha256(path), "storage_key": key})
    ctx.check()
    return {"status": jobs.JobStatus.SUCCEEDED, "metrics": metrics, "artifacts": artifacts}


def _notify_webhook(job: Job, status: str) -> None:
    """Best effort: tell the client's webhook the job finished. The job's state never depends on it."""
    if not job.webhook_url:
        return
    body = json.dumps({"id": job.id, "status": str(status), "finished_at": utcnow().isoformat()}).encode()
    request = urllib.request.Request(job.webhook_url, data=body, headers={"Content-Type": "application/json"},
                                     method="POST")
    try:
        urllib.request.urlopen(request, timeout=5).close()
    except Exception as exc:
        log.warning("webhook for job %s failed: %s", job.id, exc)
