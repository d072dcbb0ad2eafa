"""The two ends of a job that need credentials: reading its inputs (database rows, storage objects) into a
scratch folder, and publishing its outputs back. Everything in between reads and writes only that folder, so
it can run where the credentials are not (see worker.tasks for the order).
"""

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.core import input_specs
from app.core.config import Settings
from app.core.db import session_scope
from app.core.errors import ErrorCode
from app.core.queries import job_datasets, job_students, owned
from app.core.recipe import DatasetRefs, Recipe, Target, TuneSpec
from app.core.statuses import ModelStatus
from app.core.storage import Storage
from app.core.storage import keys as storage_keys
from app.core.tables import Job, Model
from worker.errors import JobFailure
from worker.pipeline.files import Files, Output, StagedJob, download_stem, sha256_of


def scratch_folder(settings: Settings, prefix: str) -> Path:
    """A fresh folder under MODELPRESS_HOME/work for one job or inspection; the caller removes it."""
    root = settings.resolved_home() / "work"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def stage_inputs(factory: sessionmaker[Session], storage: Storage, job: Job, workdir: Path) -> StagedJob:
    """Check that what the job names still exists and is the tenant's, then download it into `workdir`."""
    recipe = Recipe.model_validate(job.recipe) if job.recipe else None
    tune = TuneSpec.model_validate(job.tune) if job.tune else None
    candidates = ([recipe] if recipe else []) + list(tune.search or [] if tune else [])
    with session_scope(factory) as session:
        model = owned(session, Model, job.model_id, job.tenant_id)
        if model is None:
            raise JobFailure(ErrorCode.MODEL_MISSING, f"model {job.model_id!r} was deleted")
        if model.status == ModelStatus.INVALID:
            raise JobFailure(ErrorCode.MODEL_INVALID, f"model {model.id} is invalid: {model.error}")
        sources: dict[str, tuple[str, Path, str]] = {"model": (model.storage_key, workdir / f"input.{model.format}",
                                                               model.format)}
        dataset_files: Files = {}
        for role, dataset_id, dataset in job_datasets(session, job.tenant_id, DatasetRefs(**(job.datasets or {}))):
            if dataset is None:
                raise JobFailure(ErrorCode.DATASET_MISSING, f"{role} dataset {dataset_id!r} was deleted")
            dataset_files[role] = (workdir / f"{role}.{dataset.format}", dataset.format)
            sources[role] = (dataset.storage_key, *dataset_files[role])
        student_files: Files = {}
        for _, student_id, student in job_students(session, job.tenant_id, candidates):
            if student is None:
                raise JobFailure(ErrorCode.MODEL_MISSING, f"student model {student_id!r} was deleted")
            student_files[student_id] = (workdir / f"student-{student_id}.{student.format}", student.format)
            sources[student_id] = (student.storage_key, *student_files[student_id])
        staged = StagedJob(recipe=recipe, tune=tune, target=Target.model_validate(job.target),
                           model_path=sources["model"][1], model_format=model.format, model_name=model.name,
                           dataset_files=dataset_files, student_files=student_files,
                           min_fidelity=job.min_fidelity, accept_degraded=bool(job.accept_degraded),
                           input_specs=input_specs.from_json(job.input_specs), job_id=job.id, model_id=model.id)
    for key, path, _ in sources.values():
        storage.get_file(key, path)
    return staged


ARTIFACT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def artifact_name(name) -> str:
    """An output's own name, as the pipeline gives it (`compressed.onnx`): the storage key is built from it."""
    if not isinstance(name, str) or not ARTIFACT_NAME.fullmatch(name) or ".." in name:
        raise JobFailure(ErrorCode.INTERNAL_ERROR, "the job reported an output with an invalid name")
    return name


def publish_outputs(storage: Storage, job: Job, staged: StagedJob, outputs: list[Output], metrics: dict[str, Any],
                    workdir: Path) -> list[dict[str, Any]]:
    """Store the job's files and its JSON report under the job's keys; returns the artifact rows to record.
    Keys are built from ids and the outputs' fixed names, so a re-run overwrites rather than duplicates; the
    tenant's model name only prefixes the download name."""
    report = workdir / "report.json"
    report.write_text(json.dumps(metrics, indent=2))
    stem = download_stem(staged.model_name)
    artifacts = []
    for kind, fmt, path, name in [*((o.kind, o.format, o.path, o.filename) for o in outputs),
                                  ("report", "json", report, "report.json")]:
        key = storage_keys.job_key(job.tenant_id, job.id, name)
        storage.put_file(key, path)
        artifacts.append({"kind": kind, "format": fmt, "filename": f"{stem}-{name}", "size_bytes": path.stat().st_size,
                          "sha256": sha256_of(path), "storage_key": key})
    return artifacts


TRIAL_FORMATS = {".onnx": "onnx", ".pt2": "pt2", ".zip": "onnx-seq2seq"}  # a zip: an encoder-decoder's two graphs


def publish_provisional(storage: Storage, job: Job, staged: StagedJob, path: Path, index: int) -> dict[str, Any]:
    """Store a tune job's best trial so far under a key of its own, per trial and attempt (a better trial's file
    never overwrites one a client may be downloading, nor does a worker that lost the job overwrite the file of the
    one that took it over); returns its artifact row, for app.core.jobs.record_provisional."""
    fmt = TRIAL_FORMATS.get(path.suffix)
    if fmt is None:
        raise JobFailure(ErrorCode.INTERNAL_ERROR, "the job reported a trial model of an unknown format")
    name = f"best-so-far-trial{index}{path.suffix}"
    key = storage_keys.job_key(job.tenant_id, job.id, f"attempt{job.attempts}-{name}")
    storage.put_file(key, path)
    return {"kind": "model", "format": fmt, "filename": f"{download_stem(staged.model_name)}-{name}",
            "size_bytes": path.stat().st_size, "sha256": sha256_of(path), "storage_key": key}
