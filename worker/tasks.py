"""Celery tasks. They take ids, read everything else from the database, and record every outcome there.

Re-delivery is safe: `jobs.claim` lets only one worker run a job, outputs go to fixed keys per job, and
`jobs.finish` replaces the job's artifact rows instead of adding to them.
"""

import json
import logging
import shutil
import time
import urllib.request
from pathlib import Path

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update

from app.core import jobs
from app.core.config import get_settings
from app.core.db import utcnow
from app.core.errors import ErrorCode
from app.core.queue import TaskName
from app.core.statuses import JobStatus, ModelStatus
from app.core.tables import Job, Model
from worker import resources, staging
from worker.context import JobContext, with_db_retry
from worker.errors import JobCancelled, JobFailure, JobLost

log = logging.getLogger(__name__)
_settings = get_settings()
# The soft limit raises SoftTimeLimitExceeded in the task, which records `timeout`; the hard limit kills it.
TIME_LIMITS = {"soft_time_limit": _settings.job_soft_time_limit, "time_limit": _settings.job_time_limit}


@shared_task(name=TaskName.INSPECT_MODEL, **TIME_LIMITS)
def inspect_model(model_id: str) -> None:
    """Open an uploaded model safely and set it `ready` (with its description) or `invalid` (with why)."""
    from worker import formats

    settings, factory, storage = resources.settings(), resources.session_factory(), resources.storage()

    def start(session):
        model = session.get(Model, model_id)
        if model is None or model.status != ModelStatus.UPLOADED:
            return None
        # A killed worker's message comes straight back (task_reject_on_worker_lost): without this bound, a model
        # that kills whoever loads it (out of memory) would be inspected again as fast as it kills.
        if model.inspect_attempts >= settings.job_max_attempts:
            model.status = ModelStatus.INVALID
            model.error = f"the worker inspecting this model died {model.inspect_attempts} times; giving up"
            return None
        model.inspect_attempts += 1
        return model.storage_key, model.format

    claimed = with_db_retry(factory, start)
    if claimed is None:
        return
    key, fmt = claimed
    workdir = staging.scratch_folder(settings, "inspect-")
    try:
        local = workdir / f"model.{fmt}"
        storage.get_file(key, local)
        info, status, error = formats.inspect(local, fmt, workdir), ModelStatus.READY, None
    except JobFailure as exc:
        info, status, error = None, ModelStatus.INVALID, exc.message
    except SoftTimeLimitExceeded:
        info, status, error = None, ModelStatus.INVALID, "inspection took longer than the time limit"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    with_db_retry(factory, lambda s: s.execute(
        update(Model).where(Model.id == model_id, Model.status == ModelStatus.UPLOADED)
        .values(status=status, info=info, error=error)))
    log.info("model %s inspected: %s %s", model_id, status, error or "")


@shared_task(name=TaskName.RUN_JOB, **TIME_LIMITS)
def run_job(job_id: str) -> None:
    settings, factory, storage = resources.settings(), resources.session_factory(), resources.storage()
    worker_id = resources.worker_id()
    job = with_db_retry(factory, lambda s: jobs.claim(s, job_id, worker_id,
                                                      jobs.stale_cutoff(settings.heartbeat_timeout)))
    if job is None:
        log.info("job %s is not runnable here (finished, cancelled or alive elsewhere); dropping message", job_id)
        return
    outcome: dict = {"status": JobStatus.FAILED}
    workdir = staging.scratch_folder(settings, f"{job_id}-")
    try:
        with JobContext(factory, job_id, worker_id, settings.heartbeat_interval) as ctx:
            try:
                outcome = _run(job, workdir, settings, storage, factory, ctx)
            except JobCancelled:
                outcome = {"status": JobStatus.CANCELLED, "error_code": ErrorCode.CANCELLED,
                           "error_message": "cancelled by the user"}
            except JobFailure as exc:
                outcome = {"status": JobStatus.FAILED, "error_code": exc.code, "error_message": exc.message}
            except SoftTimeLimitExceeded:
                outcome = {"status": JobStatus.FAILED, "error_code": ErrorCode.TIMEOUT,
                           "error_message": f"the job ran past its time limit of {settings.job_soft_time_limit}s"}
            except JobLost:
                log.warning("job %s was taken over by another worker; stopping", job_id)
                return
            except Exception as exc:  # a bug or an unexpected library error: record it, never lose the job
                log.exception("job %s failed unexpectedly", job_id)
                outcome = {"status": JobStatus.FAILED, "error_code": ErrorCode.INTERNAL_ERROR,
                           "error_message": f"{exc.__class__.__name__}: {str(exc)[:500]}"}
        finished = with_db_retry(factory, lambda s: jobs.finish(s, job_id, worker_id, **outcome))
        if finished:
            _notify_webhook(job, outcome["status"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(job: Job, workdir: Path, settings, storage, factory, ctx: JobContext) -> dict:
    """Authorize (done: the job was claimed), stage the inputs, run the pipeline on local files only, publish."""
    from worker.pipeline.runner import run_pipeline

    if job.target.get("device", "cpu") == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise JobFailure(ErrorCode.CUDA_UNAVAILABLE, "the job targets cuda but this worker has no CUDA device; "
                                                         "it must run on a GPU worker (queue 'gpu')")
    staged = staging.stage_inputs(factory, storage, job, workdir)
    # Training stops in time for the steps after it to finish within the job's soft time limit.
    deadline = time.monotonic() + 0.8 * settings.job_soft_time_limit
    result = run_pipeline(staged, workdir, settings, ctx, deadline)
    ctx.progress(0.95, "upload", "storing artifacts")
    metrics = {**result.metrics, "job_id": job.id, "model_id": job.model_id}
    artifacts = staging.publish_outputs(storage, job, staged, result.outputs, metrics, workdir)
    ctx.check()
    return {"status": JobStatus.SUCCEEDED, "metrics": metrics, "artifacts": artifacts}


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
