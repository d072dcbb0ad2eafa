"""The dry run of a job (`POST /v1/jobs` with `"dry_run": true`): what the job would do, before anything is spent.

It checks what a submission checks (services.check_submission: the same refusals with the same errors), then
resolves the recipe, lists a tune job's candidates (app.core.tuning, as the worker will), matches the datasets to
the model's inputs from their upload headers (app.core.dataset_fit, the worker's own rules), and says whether a
worker serves the job's queue as the service itself judges it (app.core.presence: the workers' queue heartbeats,
which also decide a waiting job's message and its `no_worker` failure). Nothing is written: no job, no message, no
idempotency record.
"""

from datetime import timedelta

from sqlalchemy.orm import Session

from app.api.schemas import JobCreate, JobPlan, PlannedDataset, PlannedModel, PlannedQueue, PlannedTuning
from app.api.services import check_submission
from app.core import dataset_fit, input_specs, presence
from app.core.config import Settings
from app.core.db import utcnow
from app.core.presets import PRESETS
from app.core.queries import job_datasets
from app.core.queue import Queue
from app.core.recipe import DEFAULT_MIN_FIDELITY, TRAINING_OPS, QuantizeStep, Recipe
from app.core.statuses import ModelStatus
from app.core.tables import Dataset, Model
from app.core.tuning import job_candidates
from app.core.vetting.dataset_files import LABELS


def plan_job(session: Session, settings: Settings, tenant_id: str, body: JobCreate) -> JobPlan:
    """The plan of the job `body` describes; raises the error its submission would get."""
    model, specs_json = check_submission(session, settings, tenant_id, body, lock=False)
    specs = input_specs.from_json(specs_json)
    inputs = (model.info or {}).get("inputs") if model.status == ModelStatus.READY else None
    datasets = [_planned_dataset(role, dataset, model, inputs, specs)
                for role, _, dataset in job_datasets(session, tenant_id, body.datasets)]
    tuning = _planned_tuning(body, model)
    planned_model = PlannedModel(id=model.id, name=model.name, format=model.format, status=model.status)
    queue = _planned_queue(session, body.target.queue, settings)
    evaluation = ("eval dataset" if body.datasets.eval else "calibration dataset" if body.datasets.calibration
                  else "generated inputs")
    floor_source = ("default" if body.min_fidelity is None else
                    "preset" if body.preset and PRESETS[body.preset].min_fidelity == body.min_fidelity else "job")
    return JobPlan(
        dry_run=True, name=body.name, model=planned_model, preset=body.preset,
        recipe=body.recipe.model_dump(mode="json") if body.recipe else None, tune=tuning,
        target=body.target.model_dump(mode="json"),
        min_fidelity=DEFAULT_MIN_FIDELITY if body.min_fidelity is None else body.min_fidelity,
        min_fidelity_source=floor_source, accept_degraded=body.accept_degraded, input_specs=specs_json,
        datasets=datasets, evaluation=evaluation, queue=queue,
        warnings=_warnings(body, planned_model, datasets, tuning, queue, evaluation, specs, settings))


def _planned_dataset(role: str, dataset: Dataset, model: Model, inputs: list[dict] | None,
                     specs: dict[str, input_specs.InputSpec]) -> PlannedDataset:
    used_for = {"eval": ["fidelity", "accuracy"] if dataset.has_labels else ["fidelity"],
                "calibration": ["calibration"], "train": ["training"]}[role]
    feeds, problem = {}, None
    if inputs is not None:
        try:
            feeds = _feeds(role, dataset, model, inputs, specs)
        except dataset_fit.Misfit as exc:
            problem = str(exc)
    return PlannedDataset(role=role, id=dataset.id, name=dataset.name, format=dataset.format,
                          num_samples=dataset.num_samples, has_labels=dataset.has_labels, used_for=used_for,
                          feeds=feeds, fits=None if inputs is None else problem is None, problem=problem)


def _feeds(role: str, dataset: Dataset, model: Model, inputs: list[dict],
           specs: dict[str, input_specs.InputSpec]) -> dict[str, str]:
    """Model input -> its source, as the worker will pair them (worker.evaluation.data); Misfit as the worker's
    failure would say it."""
    constants = {name for name, spec in specs.items() if spec.is_constant}
    if role == "train":
        if constants or any(spec.batch_axis for spec in specs.values()):
            raise dataset_fit.Misfit("training steps feed a dataset's samples to the model as they are: they "
                                     "cannot take input_specs with a constant value or a batch_axis other than 0")
        data_inputs, batch_axes = inputs, {}
    else:
        data_inputs = [entry for entry in inputs if entry["name"] not in constants]
        batch_axes = {name: spec.batch_axis for name, spec in specs.items() if not spec.is_constant}
        if not data_inputs:
            raise dataset_fit.Misfit(f"{role} dataset: every model input is a constant in input_specs, so the "
                                     "dataset has nothing to give")
    feeds = {name: "a constant of the input specs" for name in constants if role != "train"}
    if dataset.format == "jsonl":
        if not (model.info or {}).get("tokenizer"):
            raise dataset_fit.Misfit(f"{role} dataset: a .jsonl text dataset needs a Hugging Face model that ships "
                                     "its tokenizer")
        return {**{entry["name"]: "texts through the model's tokenizer" for entry in data_inputs}, **feeds}
    arrays = {name: (facts["shape"], facts["dtype"]) for name, facts in (dataset.info.get("arrays") or {}).items()
              if name != LABELS}
    pairs = dataset_fit.check_fit(arrays, data_inputs, role, batch_axes)
    return {**{entry["name"]: f"array {name!r}" for name, entry in pairs}, **feeds}


def _planned_tuning(body: JobCreate, model: Model) -> PlannedTuning | None:
    if body.tune is None:
        return None
    user = [body.recipe] if body.recipe else []
    user += list(body.tune.search or [])
    layers = ((model.info or {}).get("architecture") or {}).get("layers") or []
    candidates = job_candidates(user, target=body.target, datasets=body.datasets, model_format=model.format,
                                info=model.info, layer_names=layers, objective=body.tune.objective)
    note = None
    if not user and model.format == "hf":
        note = ("generated pruning candidates also keep the model's output head dense; its layer name is known "
                "once the worker loads the model")
    return PlannedTuning(metric=body.tune.metric, max_loss=body.tune.max_loss, objective=body.tune.objective,
                         max_trials=body.tune.max_trials, time_budget_s=body.tune.time_budget_s,
                         generated=not user, candidates=candidates, note=note)


def _planned_queue(session: Session, queue: Queue, settings: Settings) -> PlannedQueue:
    served = presence.last_served(session)
    unserved = presence.unserved(served, utcnow() - timedelta(seconds=settings.heartbeat_timeout))
    return PlannedQueue(name=queue.value, workers="none" if queue.value in unserved else "available",
                        last_served_at=served.get(queue.value))


def _recipes(body: JobCreate, tuning: PlannedTuning | None) -> list[Recipe]:
    """Every recipe the job may run: its recipe, or the candidates it would try."""
    if tuning is not None:
        return [Recipe.model_validate(recipe) for recipe in tuning.candidates]
    return [body.recipe] if body.recipe else []


def _warnings(body: JobCreate, model: PlannedModel, datasets: list[PlannedDataset], tuning: PlannedTuning | None,
              queue: PlannedQueue, evaluation: str, specs: dict[str, input_specs.InputSpec],
              settings: Settings) -> list[str]:
    warnings = []
    if model.status != ModelStatus.READY:
        warnings.append(f"the model is still being inspected (status {model.status!r}): its inputs are not known "
                        "yet, so the worker checks the datasets and input specs against them when the job runs")
    for dataset in datasets:
        if dataset.problem:
            warnings.append(f"datasets.{dataset.role}: {dataset.problem}; the job would fail")
    if evaluation == "generated inputs":
        made = " under the job's input specs" if specs else ""
        warnings.append(f"no eval dataset: fidelity is measured on generated inputs (seeded random values of the "
                        f"model's input shapes{made}), and there is no accuracy; give an eval dataset of real inputs "
                        "to judge the model on what it will see")
    elif evaluation == "calibration dataset":
        warnings.append("no eval dataset: fidelity is measured on the calibration dataset's inputs (real data, "
                        "though calibration saw it), and there is no accuracy")
    recipes = _recipes(body, tuning)
    steps = [step for recipe in recipes for step in recipe.steps]
    if (body.target.runtime == "onnxruntime" and not body.datasets.calibration
            and any(isinstance(s, QuantizeStep) and s.method == "auto" for s in steps)):
        source = "generated inputs" if evaluation == "generated inputs" else "the eval dataset's inputs"
        warnings.append(f"quantize method 'auto' chooses static int8 for convolutional nets, calibrated here on "
                        f"{source} (no calibration dataset); give a calibration dataset of real inputs")
    if body.datasets.train and not any(step.op in TRAINING_OPS for step in steps):
        warnings.append("datasets.train is given, but no step of the job trains: it is not used")
    if body.tune is not None and body.tune.metric == "accuracy":
        eval_set = next((d for d in datasets if d.role == "eval"), None)
        if eval_set is not None and not eval_set.has_labels:
            warnings.append(f"tune.metric 'accuracy' needs labels, and eval dataset {eval_set.id!r} has none: the "
                            "job would fail with invalid_dataset")
    if tuning is not None and not tuning.candidates:
        warnings.append("no candidate recipe fits this target and model: the tune job would fail")
    if queue.workers == "none":
        start = "`modelpress worker --queues gpu`, on a machine with CUDA" if queue.name == Queue.GPU else \
            "`modelpress worker`"
        warnings.append(f"no worker serves the {queue.name!r} queue now: the job would wait queued until one starts "
                        f"({start}), and fail with no_worker after {settings.queue_timeout:g} s")
    return warnings
