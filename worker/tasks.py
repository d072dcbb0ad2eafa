"""Celery tasks. They take ids, read everything else from the database, and record every outcome there.

Each task is split where the credentials stop: this process claims the row, stages the inputs from storage and
publishes the outputs (worker.staging); everything that parses, loads or runs the uploaded files happens in a
sandboxed child that holds no secrets (worker.sandbox). Whatever fails, at any stage, the row ends in a
terminal state with a code.

Re-delivery is safe: `jobs.claim` lets only one worker run a job, outputs go to fixed keys per job, and
`jobs.finish` replaces the job's artifact rows instead of adding to them.
"""

import logging
import shutil
import time
from pathlib import Path

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update

from app.core import input_specs, jobs
from app.core.config import Settings, get_settings
from app.core.errors import ErrorCode
from app.core.queue import TaskName
from app.core.statuses import JobStatus, ModelStatus
from app.core.storage import keys as storage_keys
from app.core.tables import Job, Model
from worker import resources, sandbox, staging
from worker.context import JobContext, with_db_retry
from worker.errors import JobCancelled, JobFailure, JobLost, without_server_paths
from worker.pipeline.files import Output
from worker.sandbox_child import inject_fault

log = logging.getLogger(__name__)
_settings = get_settings()
# The soft limit raises SoftTimeLimitExceeded in the task, which records `timeout`; the hard limit kills it.
TIME_LIMITS = {"soft_time_limit": _settings.job_soft_time_limit, "time_limit": _settings.job_time_limit}
# What the sandbox may deliver, by kind (the JSON report is written here). onnx-seq2seq: a zip of two graphs;
# safetensors-dense: the plain layout of a sparse model's weights; the card is markdown, the HTML report one page.
OUTPUT_FORMATS = {"model": {"onnx", "pt2", "safetensors", "safetensors-dense", "hf", "onnx-seq2seq"},
                  "card": {"md"}, "report": {"html"}}


@shared_task(name=TaskName.INSPECT_MODEL, **TIME_LIMITS)
def inspect_model(model_id: str) -> None:
    """Open an uploaded model in the sandbox and set it `ready` (with its description) or `invalid` (with why)."""
    settings, factory, storage = resources.settings(), resources.session_factory(), resources.storage()

    def start(session):
        model = session.get(Model, model_id)
        if model is None or model.status != ModelStatus.UPLOADED:
            return None
        # A killed worker's message comes straight back (task_reject_on_worker_lost): without this bound, a model
        # that kills whoever loads it would be inspected again as fast as it kills.
        if model.inspect_attempts >= settings.job_max_attempts:
            model.status = ModelStatus.INVALID
            model.error = f"the worker inspecting this model died {model.inspect_attempts} times; giving up"
            return None
        model.inspect_attempts += 1
        return model.storage_key, model.format, model.input_specs

    claimed = with_db_retry(factory, start)
    if claimed is None:
        return
    key, fmt, specs = claimed
    workdir = staging.scratch_folder(settings, "inspect-")
    info, status, error = None, ModelStatus.INVALID, None
    try:
        local = workdir / f"model.{fmt}"
        storage.get_file(key, local)
        inject_fault(settings, "stage")
        outcome = sandbox.run(sandbox.request(settings, "inspect", workdir, model=(local, fmt)),
                              wall_seconds=settings.job_soft_time_limit)
        if outcome.value is not None and isinstance(outcome.value.get("info"), dict):
            info, status = outcome.value["info"], ModelStatus.READY
            error = _upload_specs_problem(specs, info)
            if error:
                status = ModelStatus.INVALID
        else:
            error = sandbox.scrub_paths(outcome.message, workdir, settings.resolved_home())
    except SoftTimeLimitExceeded:
        error = "inspection took longer than the time limit"
    except Exception as exc:  # staging failed, or a bug: the model must not stay `uploaded` for hours
        log.exception("inspection of %s failed", model_id)
        error = ("inspection failed: "
                 f"{without_server_paths(sandbox.scrub_paths(f'{exc.__class__.__name__}: {exc}', workdir))[:500]}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    with_db_retry(factory, lambda s: s.execute(
        update(Model).where(Model.id == model_id, Model.status == ModelStatus.UPLOADED)
        .values(status=status, info=info, error=error)))
    log.info("model %s inspected: %s %s", model_id, status, error or "")


def _upload_specs_problem(specs: dict | None, info: dict) -> str | None:
    """The input specs given at upload must fit the inputs inspection found (as a job's must at submission)."""
    problems = input_specs.problems_against_model(input_specs.from_json(specs), info.get("inputs") or [])
    return f"the upload's input_specs do not fit the model: {'; '.join(problems[:5])}" if problems else None


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
                outcome = {"status": JobStatus.FAILED, "error_code": exc.code,
                           "error_message": sandbox.scrub_paths(exc.message, workdir, settings.resolved_home())}
            except SoftTimeLimitExceeded:
                outcome = {"status": JobStatus.FAILED, "error_code": ErrorCode.TIMEOUT,
                           "error_message": f"the job ran past its time limit of {settings.job_soft_time_limit}s"}
            except JobLost:
                log.warning("job %s was taken over by another worker; stopping", job_id)
                return
            except Exception as exc:  # a bug or an unexpected library error: record it, never lose the job
                log.exception("job %s failed unexpectedly", job_id)
                # a library's own text: any path of this machine goes, not only the job's folders
                message = without_server_paths(sandbox.scrub_paths(f"{exc.__class__.__name__}: {str(exc)[:500]}",
                                                                   workdir, settings.resolved_home()))
                outcome = {"status": JobStatus.FAILED, "error_code": ErrorCode.INTERNAL_ERROR,
                           "error_message": message}
        _finish(factory, storage, job_id, worker_id, outcome)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _finish(factory, storage, job_id: str, worker_id: str, outcome: dict) -> None:
    """Record the outcome (its artifacts replace the provisional one), then delete the stored files of provisional
    artifacts the outcome does not keep. A file left by a crash here is an orphan the API's sweep removes."""

    def finish(session) -> list[str]:
        provisional = jobs.provisional_keys(session, job_id)
        return provisional if jobs.finish(session, job_id, worker_id, **outcome) else []

    kept = {artifact["storage_key"] for artifact in outcome.get("artifacts") or []}
    _delete_files(storage, [key for key in with_db_retry(factory, finish) if key not in kept])


def _delete_files(storage, keys: list[str]) -> None:
    for key in keys:
        try:
            storage.delete(key)
        except Exception as exc:  # storage down: the sweep removes unreferenced files later
            log.warning("could not delete %s: %s", key, exc)


def _run(job: Job, workdir: Path, settings: Settings, storage, factory, ctx: JobContext) -> dict:
    """Stage the inputs (credentials), run the pipeline in the sandbox (local files only), publish the outputs."""
    staged = staging.stage_inputs(factory, storage, job, workdir)
    inject_fault(settings, "stage")
    # Training stops in time for the steps after it to finish within the job's soft time limit.
    deadline = time.monotonic() + 0.8 * settings.job_soft_time_limit
    trials = TrialsSoFar(job, staged, ctx, workdir, storage, factory)
    result = sandbox.run(sandbox.request(settings, "run_job", workdir, staged=staged, deadline=deadline),
                         progress=ctx.progress, check=ctx.check, on_trial=trials.add, on_best=trials.best_so_far,
                         wall_seconds=settings.job_soft_time_limit)
    if result.code is not None and trials.best is not None:  # stopped or failed before tuning ended
        return trials.deliver(result.code, sandbox.scrub_paths(result.message, workdir, settings.resolved_home()))
    if result.code == ErrorCode.CANCELLED:
        raise JobCancelled(job.id)
    if result.code is not None:
        raise JobFailure(result.code, result.message)
    ctx.progress(0.95, "upload", "storing artifacts")
    inject_fault(settings, "publish")
    metrics = result.value.get("metrics")
    if not isinstance(metrics, dict):
        raise JobFailure(ErrorCode.INTERNAL_ERROR, "the job reported no metrics")
    metrics = {**metrics, "job_id": job.id, "model_id": job.model_id}
    artifacts = staging.publish_outputs(storage, job, staged, _outputs(result.value.get("outputs"), workdir), metrics,
                                        workdir)
    ctx.check()
    verdict = metrics.get("fidelity_floor")
    if isinstance(verdict, dict) and verdict.get("passed") is False and not staged.accept_degraded:
        # The model is kept (downloadable) so the user can see what went wrong.
        return {"status": JobStatus.FAILED, "error_code": ErrorCode.FIDELITY_COLLAPSE, "metrics": metrics,
                "artifacts": artifacts,
                "error_message": f"{verdict.get('message', 'the compressed model fell below the fidelity floor')}"
                                 "; the model is kept for inspection; min_fidelity sets the floor, "
                                 "accept_degraded: true accepts such a model"}
    return {"status": JobStatus.SUCCEEDED, "metrics": metrics, "artifacts": artifacts}


class TrialsSoFar:
    """The tuning trials the sandbox has finished, as it reported them (shown as progress), and the best one so far,
    as the sandbox names it: published at once as the job's provisional artifact, and delivered as its model
    artifact if the run stops or fails before tuning ends."""

    def __init__(self, job: Job, staged, ctx: JobContext, workdir: Path, storage, factory):
        self.job, self.staged, self.ctx, self.workdir, self.storage, self.factory = \
            job, staged, ctx, workdir, storage, factory
        self.extension = "onnx" if staged.target.runtime == "onnxruntime" else "pt2"
        self.trials: list[dict] = []
        self.best: dict | None = None
        self.provisional: dict | None = None  # the best one's artifact row, once stored and recorded

    def add(self, message: dict) -> None:
        try:
            trial = {"index": int(message["index"]), "path": str(message["path"]),
                     "recipe": message["recipe"] if isinstance(message.get("recipe"), dict) else None,
                     "size_bytes": int(message["size_bytes"]), "latency_ms": float(message["latency_ms"]),
                     "metric": float(message["metric"]), "meets_tolerance": bool(message["meets_tolerance"])}
        except (KeyError, TypeError, ValueError):
            return  # not a trial this worker can use
        self.trials.append(trial)
        self.ctx.progress(0.3, "tune", f"trial {trial['index'] + 1} done: {trial['size_bytes']} bytes, p50 "
                                       f"{trial['latency_ms']:.3g} ms, metric {trial['metric']:.4f}"
                                       + (" (within the tolerance)" if trial["meets_tolerance"] else ""),
                          trial=trial["index"])

    def best_so_far(self, message: dict) -> None:
        """The sandbox says a finished trial is the best so far: store its file and make it the job's provisional
        artifact (the previous one's row and file go). A failure here is logged: the job goes on without it."""
        index = message.get("index")
        trial = next((t for t in self.trials if t["index"] == index), None)
        if trial is None:
            return
        self.best, self.provisional = trial, None
        job_id, worker_id = self.job.id, self.ctx.worker_id
        try:
            path = sandbox.safe_output(self.workdir, trial["path"])
            artifact = staging.publish_provisional(self.storage, self.job, self.staged, path, trial["index"])
            stale = with_db_retry(self.factory, lambda s: jobs.record_provisional(s, job_id, worker_id, artifact))
        except Exception as exc:  # storage or database down, or the file already gone: no provisional artifact
            log.warning("job %s: trial %s not published as the best so far: %s", job_id, index, exc)
            return
        if stale is None:  # the job is no longer this worker's
            _delete_files(self.storage, [artifact["storage_key"]])
            return
        self.provisional = artifact
        _delete_files(self.storage, stale)

    def deliver(self, code: ErrorCode, why: str) -> dict:
        """End the stopped job with the best trial so far as its model artifact (the provisional one, now final),
        and the trials in its metrics."""
        best, job = self.best, self.job
        seq2seq = Path(best["path"]).suffix == ".zip"  # an encoder-decoder's two graphs (worker.formats.onnx_pair)
        name = f"best-trial.{'zip' if seq2seq else self.extension}"
        if self.provisional is not None:
            artifact = {**self.provisional, "filename": name}  # stays where it is stored
        else:
            path = sandbox.safe_output(self.workdir, best["path"])
            key = storage_keys.job_key(job.tenant_id, job.id, name)
            self.storage.put_file(key, path)
            artifact = {"kind": "model", "format": "onnx-seq2seq" if seq2seq else self.extension, "filename": name,
                        "size_bytes": path.stat().st_size, "sha256": staging.sha256_of(path), "storage_key": key}
        cancelled = code == ErrorCode.CANCELLED
        message = ("cancelled by the user" if cancelled else why) + \
            f"; the best of {len(self.trials)} finished tuning trials (trial {best['index']}) is delivered"
        return {"status": JobStatus.CANCELLED if cancelled else JobStatus.FAILED, "error_code": code,
                "error_message": message, "artifacts": [artifact],
                "metrics": {"tuning": {"trials": [{k: v for k, v in t.items() if k != "path"} for t in self.trials],
                                       "best": best["index"], "complete": False}, "job_id": job.id,
                            "model_id": job.model_id}}


def _outputs(reported, workdir: Path) -> list[Output]:
    """The files the child says it delivered, checked: known kinds and formats, fixed names, its own files."""
    if not isinstance(reported, list) or not reported:
        raise JobFailure(ErrorCode.INTERNAL_ERROR, "the job reported no output")
    outputs = []
    for item in reported:
        if not isinstance(item, dict) or item.get("format") not in OUTPUT_FORMATS.get(item.get("kind"), ()):
            raise JobFailure(ErrorCode.INTERNAL_ERROR, "the job reported an output of an unknown kind")
        name = staging.artifact_name(item.get("filename"))
        outputs.append(Output(item["kind"], item["format"], sandbox.safe_output(workdir, item.get("path")), name))
    return outputs
