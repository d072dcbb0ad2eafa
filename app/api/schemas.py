"""Request and response bodies of the HTTP API. The recipe itself (steps, target, tuning) is the core's
contract with the workers: app.core.recipe."""

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    field_validator,
    model_validator,
)

from app.core.input_specs import InputSpecs
from app.core.presets import PRESETS, preset_recipe
from app.core.recipe import (
    DatasetRefs,
    Id,
    Name,
    Recipe,
    StrictModel,
    Target,
    TuneSpec,
    check_recipe_for_target,
    no_control_characters,
)

MAX_GRACE_SECONDS = 86400
MAX_KEY_LIFETIME = timedelta(days=365)
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
PresetName = Annotated[str, StringConstraints(max_length=64), AfterValidator(no_control_characters)]

# Ids and times the examples below use (what the service returns looks like this).
MODEL_ID = "mdl_0193a1b2c3d4e5f60718293a"
DATASET_ID = "ds_0193a1b2c3d4f0e1d2c3b4a5"
JOB_ID = "job_0193a1b2c3d5a0b1c2d3e4f5"
ARTIFACT_ID = "art_0193a1b2c3d6a1b2c3d4e5f6"
KEY_ID = "key_0193a1b2c3d7b2c3d4e5f6a7"
EVENT_ID = "msg_0193a1b2c3d8c3d4e5f6a7b8"
CREATED = "2026-12-18T09:00:00.123456Z"
FINISHED = "2026-12-18T09:01:12.654321Z"
SHA256 = "9f2b5c1d8e7a6b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c"


class JobCreate(StrictModel):
    """A compression job: a model, what to do to it (a recipe, a preset or a tuning search), the datasets and the
    target. `dry_run` answers the plan instead of creating the job."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model_id": MODEL_ID, "name": "int8 for the edge box", "preset": "int8-cpu"},
        {"model_id": MODEL_ID, "recipe": {"steps": [{"op": "quantize", "method": "static", "dtype": "int8"}]},
         "datasets": {"calibration": DATASET_ID}, "target": {"runtime": "onnxruntime", "device": "cpu"},
         "min_fidelity": 0.95, "dry_run": True}]})

    model_id: Id = Field(description="the tenant's model to compress")
    name: Name | None = Field(default=None, description="a label for the job (up to 200 characters)",
                              examples=["int8 for the edge box"])
    recipe: Recipe | None = Field(default=None, description="the steps to apply; give this, a `preset` or `tune`")
    preset: PresetName | None = Field(default=None, description="a named recipe from `GET /v1/presets` instead of "
                                                                "`recipe`", examples=["int8-cpu"])
    tune: TuneSpec | None = Field(default=None, description="try candidate recipes and keep the best within a "
                                                            "tolerance (beside a recipe, the recipe is the first "
                                                            "candidate)")
    datasets: DatasetRefs = Field(default_factory=DatasetRefs, description="the job's datasets by role")
    target: Target = Field(default_factory=Target, description="where the compressed model will run")
    webhook_url: HttpUrl | None = Field(default=None, description="an HTTPS or HTTP URL that gets one signed POST "
                                                                  "when the job ends (public addresses only)",
                                        examples=["https://hooks.example.com/modelpress"])
    # The final model's output cosine must reach this (default 0.9, or the preset's), else the job fails with
    # `fidelity_collapse`; `accept_degraded` lets such a job succeed, marked `degraded`.
    min_fidelity: float | None = Field(default=None, ge=0.0, le=1.0,
                                       description="the output cosine the final model must reach against the "
                                                   "original (default 0.9, or the preset's), else the job fails "
                                                   "with `fidelity_collapse`", examples=[0.95])
    accept_degraded: bool = Field(default=False, description="let a job whose model falls below the floor succeed, "
                                                             "marked `degraded`")
    # Per input name: how to make or read it (app.core.input_specs); over the model's own, per input.
    input_specs: InputSpecs | None = Field(default=None, description="per model input: how to make or read it "
                                                                     "(over the model's own specs, per input)",
                                           examples=[{"input": {"shape": [1, 512]}, "sr": {"value": 16000}}])
    dry_run: bool = Field(default=False, description="answer 200 with the job's plan (the recipe resolved, the "
                                                     "datasets matched to the model's inputs, the queue and its "
                                                     "workers, warnings) and create nothing; a job that would be "
                                                     "refused gets the same error as a real submission")

    @model_validator(mode="after")
    def _recipe_fits_target(self) -> "JobCreate":
        if self.preset is not None:
            if self.recipe is not None:
                raise ValueError("preset: give a recipe or a preset, not both")
            self.recipe = preset_recipe(self.preset)
            if self.min_fidelity is None:
                self.min_fidelity = PRESETS[self.preset].min_fidelity
        if self.recipe is None and self.tune is None:
            raise ValueError("recipe: a job needs a recipe, a preset or tune")
        for recipe in self.candidates():
            check_recipe_for_target(recipe, self.target, self.datasets)
        if self.tune is not None and self.tune.metric == "accuracy" and not self.datasets.eval:
            raise ValueError("datasets.eval: tune.metric 'accuracy' needs an eval dataset with labels")
        if self.tune is not None and self.tune.metric == "perplexity" and not self.datasets.eval:
            raise ValueError("datasets.eval: tune.metric 'perplexity' needs a .jsonl text eval dataset")
        return self

    def candidates(self) -> list[Recipe]:
        """Every recipe this job may run: the recipe, then the tuning search space."""
        recipes = [self.recipe] if self.recipe is not None else []
        return recipes + list(self.tune.search or []) if self.tune is not None else recipes


PLANNED_MODEL = {"id": MODEL_ID, "name": "resnet18.onnx", "format": "onnx", "status": "ready"}
PLANNED_DATASET = {"role": "calibration", "id": DATASET_ID, "name": "calibration.npz", "format": "npz",
                   "num_samples": 256, "has_labels": False, "used_for": ["calibration"],
                   "feeds": {"input": "array 'images'"}, "fits": True, "problem": None}
PLANNED_QUEUE = {"name": "cpu", "workers": "available", "last_served_at": CREATED}
PLANNED_TUNING = {"metric": "fidelity", "max_loss": 0.01, "objective": "size", "max_trials": 8, "time_budget_s": None,
                  "generated": True, "note": None, "candidates": [
                      {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8",
                                  "granularity": "per_channel"}]},
                      {"steps": [{"op": "quantize", "method": "static", "dtype": "int8",
                                  "granularity": "per_channel"}]}]}


class PlannedModel(BaseModel):
    """The model a planned job compresses."""

    model_config = ConfigDict(json_schema_extra={"examples": [PLANNED_MODEL]})

    id: str = Field(description="the model's id", examples=["mdl_01hx3k9v7qz8a4t2"])
    name: str = Field(description="the model's name", examples=["resnet18.onnx"])
    format: str = Field(description="`pt2`, `onnx` or `hf`", examples=["onnx"])
    status: str = Field(description="`ready`, or `uploaded` while a worker inspects it (its inputs are then "
                                    "unknown: datasets and input specs are checked by the worker)",
                        examples=["ready"])


class PlannedDataset(BaseModel):
    """One dataset of the job, the role it plays and whether its arrays fit the model's inputs."""

    model_config = ConfigDict(json_schema_extra={"examples": [PLANNED_DATASET]})

    role: Literal["calibration", "train", "eval"] = Field(description="the key it was given under in `datasets`")
    id: str = Field(description="the dataset's id", examples=["ds_01hx3m2c5rd7e9f0"])
    name: str = Field(description="the dataset's name", examples=["calibration.npz"])
    format: str = Field(description="`npz`, `safetensors` or `jsonl`", examples=["npz"])
    num_samples: int = Field(description="samples in the file (the job reads at most 512 for eval, 256 for "
                                         "calibration)", examples=[256])
    has_labels: bool = Field(description="whether it holds class labels (`labels` array or jsonl `label`)")
    used_for: list[str] = Field(description="what the job does with it: `fidelity` and `accuracy` (judging the "
                                            "model), `calibration`, `training`",
                                examples=[["calibration", "fidelity"]])
    feeds: dict[str, str] = Field(description="model input -> where its values come from: an array of the "
                                              "dataset, a constant of the input specs, or texts through the "
                                              "model's tokenizer", examples=[{"input": "array 'x'"}])
    fits: bool | None = Field(description="whether the arrays fit the model's inputs (names, per-sample shapes, "
                                          "dtypes); null while the model's inputs are unknown")
    problem: str | None = Field(description="why it does not fit: the job would fail with `invalid_dataset` "
                                            "(or `invalid_request`) saying this", examples=[None])


class PlannedQueue(BaseModel):
    """Where a planned job would be sent."""

    model_config = ConfigDict(json_schema_extra={"examples": [PLANNED_QUEUE]})

    name: str = Field(description="the queue the job is sent to: `cpu`, or `gpu` for `target.device: cuda`",
                      examples=["cpu"])
    workers: Literal["available", "none"] = Field(
        description="whether a worker serves that queue now (one said so within the heartbeat timeout, as "
                    "`/readyz` judges it): with `none` the job would wait `queued` until one starts, and fail with "
                    "`no_worker` after `MODELPRESS_QUEUE_TIMEOUT`")
    last_served_at: datetime | None = Field(description="when a worker last said it serves this queue; null if "
                                                        "none ever did")


class PlannedTuning(BaseModel):
    """The search a planned `tune` job would run."""

    model_config = ConfigDict(json_schema_extra={"examples": [PLANNED_TUNING]})

    metric: str = Field(description="what the trials are judged on: `fidelity`, `accuracy` or `perplexity`",
                        examples=["fidelity"])
    max_loss: float = Field(description="the loss of the metric allowed against the original", examples=[0.01])
    objective: str = Field(description="what the best trial minimises among those within `max_loss`: `size` or "
                                       "`latency`", examples=["size"])
    max_trials: int = Field(description="at most this many candidates are tried, in order", examples=[8])
    time_budget_s: float | None = Field(description="the search stops when this is spent (null: no budget)",
                                        examples=[None])
    generated: bool = Field(description="true when the service generated the candidates (no `search` and no "
                                        "recipe given)")
    candidates: list[dict[str, Any]] = Field(
        description="the recipes the search would try, in order, with the fields they set (the first `max_trials`, "
                    "as time allows); those the target or the model cannot take are left out",
        examples=[[{"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]}]])
    note: str | None = Field(description="what the plan cannot show before the model is loaded", examples=[None])


class JobPlan(BaseModel):
    """What `POST /v1/jobs` with `"dry_run": true` answers: the job as it would run. Nothing is created."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "dry_run": True, "name": "int8 for the edge box", "model": PLANNED_MODEL, "preset": "int8-static-cpu",
        "recipe": {"steps": [{"op": "quantize", "method": "static", "dtype": "int8", "granularity": "per_channel",
                              "group_size": None, "exclude": [], "calibration_method": "minmax",
                              "smoothing": None, "algorithm": "rtn"}]},
        "tune": None, "target": {"runtime": "onnxruntime", "device": "cpu"}, "min_fidelity": 0.9,
        "min_fidelity_source": "default", "accept_degraded": False, "input_specs": None,
        "datasets": [PLANNED_DATASET], "evaluation": "calibration dataset", "queue": PLANNED_QUEUE,
        "warnings": ["no eval dataset: fidelity is measured on the calibration dataset's inputs (real data, though "
                     "calibration saw it), and there is no accuracy"]}]})

    dry_run: Literal[True] = Field(description="always true: this is a plan, not a job")
    name: str | None = Field(description="the job's name", examples=["int8 for the edge box"])
    model: PlannedModel = Field(description="the model the job compresses")
    preset: str | None = Field(description="the preset the recipe came from", examples=["int8-cpu"])
    recipe: dict[str, Any] | None = Field(
        description="the recipe the job runs, a preset expanded into its steps and every default filled in",
        examples=[{"steps": [{"op": "quantize", "method": "auto", "dtype": "int8", "granularity": "per_channel",
                              "group_size": None, "exclude": [], "calibration_method": "minmax",
                              "smoothing": None, "algorithm": "rtn"}]}])
    tune: PlannedTuning | None = Field(description="for a `tune` job: the search and its candidate recipes")
    target: dict[str, Any] = Field(description="the runtime and device, defaults filled in",
                                   examples=[{"runtime": "onnxruntime", "device": "cpu"}])
    min_fidelity: float = Field(description="the fidelity floor the final model must reach (output cosine)",
                                examples=[0.9])
    min_fidelity_source: Literal["job", "preset", "default"] = Field(description="where the floor comes from")
    accept_degraded: bool = Field(description="whether a model below the floor still succeeds, marked degraded")
    input_specs: dict[str, Any] | None = Field(description="the input specs the job runs with: the model's, "
                                                           "overridden per input by the job's",
                                               examples=[{"input": {"shape": [1, 3, 224, 224]}}])
    datasets: list[PlannedDataset] = Field(description="the job's datasets, each with its role and fit")
    evaluation: Literal["eval dataset", "calibration dataset", "generated inputs"] = Field(
        description="the inputs fidelity (and accuracy) are measured on")
    queue: PlannedQueue = Field(description="where the job would be sent, and whether a worker serves it now")
    warnings: list[str] = Field(description="what deserves a look before spending the job: no eval dataset, "
                                            "calibration on generated inputs, no worker for the queue, a dataset "
                                            "that does not fit",
                                examples=[["no eval dataset: fidelity is measured on generated inputs (seeded "
                                           "random values of the model's input shapes), and there is no accuracy"]])


class Progress(BaseModel):
    """How far a job got: the step it is on and a fraction of the whole."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"fraction": 0.45, "step": "quantize", "message": "quantizing 12 layers"}]})

    fraction: float = Field(description="0 when queued, 1 when finished")
    step: str | None = Field(description="the stage or recipe step running (`load`, `measure`, an op, `tune`, "
                                         "`package`)")
    message: str | None = Field(description="what the step is doing, in words")


class JobError(BaseModel):
    """Why a job failed or was cancelled."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"code": "fidelity_collapse", "message": "the final model's output cosine 0.71 is below the floor 0.9; "
                                                 "fidelity fell most at step 0 (prune)"}]})

    code: str = Field(description="one of the service's error codes (docs/api.md, Errors)")
    message: str = Field(description="what went wrong and, where it can, what to change")


class ArtifactPublic(BaseModel):
    """A file a job produced."""

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [
        {"id": ARTIFACT_ID, "kind": "model", "format": "onnx", "filename": "resnet18-int8.onnx",
         "size_bytes": 11698432, "sha256": SHA256, "provisional": False}]})

    id: str = Field(description="the artifact's id, for `GET /v1/artifacts/{id}/download`")
    kind: str = Field(description="`model` (the compressed model, or an extra export), `report` (format `json` or "
                                  "`html`) or `card` (format `md`)")
    format: str = Field(description="`onnx`, `pt2`, `hf`, `safetensors`, `onnx-seq2seq`, `json`, `html`, `md`, ...")
    filename: str = Field(description="the name the download is sent under")
    size_bytes: int = Field(description="the file's size")
    sha256: str = Field(description="the file's SHA-256, hex (also the download's ETag)")
    provisional: bool = Field(default=False, description="a running tune job's best trial so far, replaced by a "
                                                          "better one and by the final artifacts")


class JobPublic(BaseModel):
    """A job as the service shows it: what was asked, how far it got, and its outcome."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": JOB_ID, "name": "int8 for the edge box", "model_id": MODEL_ID, "status": "succeeded",
        "recipe": {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8", "granularity": "per_channel",
                              "group_size": None, "exclude": [], "calibration_method": "minmax",
                              "smoothing": None, "algorithm": "rtn"}]},
        "tune": None, "datasets": {"calibration": None, "train": None, "eval": DATASET_ID},
        "target": {"runtime": "onnxruntime", "device": "cpu"}, "webhook_url": None, "min_fidelity": None,
        "accept_degraded": False, "input_specs": None,
        "progress": {"fraction": 1.0, "step": "done", "message": None}, "error": None,
        "metrics": {
            "baseline": {"size_bytes": 4427520, "params": 1106816, "nonzero_params": 1106816,
                         "latency_ms": {"p50": 1.92, "p95": 2.31}, "accuracy": 0.912},
            "compressed": {"size_bytes": 1140224, "params": 1106816, "nonzero_params": 1106816,
                           "latency_ms": {"p50": 1.07, "p95": 1.29}, "accuracy": 0.909},
            "compression_ratio": 3.88, "speedup": 1.79,
            "fidelity": {"cosine_mean": 0.9991, "cosine_min": 0.9978, "rel_l2": 0.041, "top1_agreement": 0.996},
            "steps": [{"op": "quantize", "seconds": 2.4}],
            "environment": {"device": "cpu", "threads": 1, "runtime": "onnxruntime"}},
        "artifacts": [{"id": ARTIFACT_ID, "kind": "model", "format": "onnx", "filename": "resnet18-int8.onnx",
                       "size_bytes": 1140224, "sha256": SHA256, "provisional": False}],
        "attempts": 1, "cancel_requested": False, "created_at": CREATED, "started_at": CREATED,
        "finished_at": FINISHED, "deleted_at": None}]})

    id: str = Field(description="the job's id")
    name: str | None = Field(description="the label given at submission")
    model_id: str = Field(description="the model it compresses (the job keeps its history if that model is deleted)")
    status: str = Field(description="`queued` -> `running` -> `succeeded` | `failed` | `cancelled`")
    recipe: dict[str, Any] | None = Field(description="the recipe, a preset expanded and defaults filled in")
    tune: dict[str, Any] | None = Field(description="the tuning search, when the job tunes")
    datasets: dict[str, Any] = Field(description="dataset ids by role: `calibration`, `train`, `eval`")
    target: dict[str, Any] = Field(description="`runtime` and `device`")
    webhook_url: str | None = Field(description="where the job's end is announced")
    min_fidelity: float | None = Field(description="the fidelity floor given (or the preset's); null: 0.9")
    accept_degraded: bool = Field(description="whether a model below the floor still succeeds, marked degraded")
    input_specs: dict[str, Any] | None = Field(description="the input specs the job runs with")
    progress: Progress = Field(description="how far the job got")
    error: JobError | None = Field(description="why it failed or was cancelled; null otherwise")
    metrics: dict[str, Any] | None = Field(description="the report once the job succeeded (or failed on the "
                                                       "fidelity floor): sizes, latency, fidelity, accuracy, steps")
    artifacts: list[ArtifactPublic] = Field(description="the files it produced")
    attempts: int = Field(description="how many times a worker started it (a worker that died is replaced)")
    cancel_requested: bool = Field(description="a cancel of the running job was asked and is pending")
    created_at: datetime = Field(description="when it was submitted (RFC 3339, UTC)")
    started_at: datetime | None = Field(description="when a worker first started it")
    finished_at: datetime | None = Field(description="when it ended")
    # When the job's outputs were deleted (DELETE /v1/jobs/{id} or the retention period); `artifacts` is then empty.
    deleted_at: datetime | None = Field(default=None, description="when the job's outputs were deleted (`DELETE "
                                                                  "/v1/jobs/{id}`, or the retention period); its "
                                                                  "`artifacts` are then empty")


class JobsPublic(BaseModel):
    """A page of jobs, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [], "next_cursor": None}]})

    data: list[JobPublic] = Field(description="the jobs on this page")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class ArtifactsPublic(BaseModel):
    """A job's files."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [
        {"id": ARTIFACT_ID, "kind": "model", "format": "onnx", "filename": "resnet18-int8.onnx",
         "size_bytes": 1140224, "sha256": SHA256}]}]})

    data: list[ArtifactPublic] = Field(description="the artifacts, the model first")


class StoredFilePublic(BaseModel):
    """What every uploaded file shows (models and datasets, as app.core.tables.StoredFile)."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="the upload's id")
    name: str = Field(description="the `name` field of the upload, else the file's name")
    format: str = Field(description="detected from the content")
    size_bytes: int = Field(description="the file's size")
    sha256: str = Field(description="the file's SHA-256, hex")


class ModelPublic(StoredFilePublic):
    """An uploaded model; a worker inspects it and sets `ready` (described in `info`) or `invalid` (`error`)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": MODEL_ID, "name": "mlp.onnx", "format": "onnx", "size_bytes": 4427520, "sha256": SHA256,
        "status": "ready", "error": None, "created_at": CREATED,
        "info": {"params": 1106816, "nonzero_params": 1106816,
                 "inputs": [{"name": "input", "shape": ["batch", 784], "dtype": "float32"}],
                 "outputs": [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}]},
        "input_specs": None}]})

    status: str = Field(description="`uploaded` -> `ready` | `invalid` once a worker has inspected it")
    error: str | None = Field(description="why the model is invalid")
    created_at: datetime = Field(description="when it was uploaded")
    info: dict[str, Any] | None = Field(description="what inspection found: `params`, `nonzero_params`, `inputs`, "
                                                    "`outputs`, `architecture`, `suggested_input_specs`")
    input_specs: dict[str, Any] | None = Field(description="the default input specs of its jobs (from the upload)")


class ModelsPublic(BaseModel):
    """A page of models, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [], "next_cursor": None}]})

    data: list[ModelPublic] = Field(description="the models on this page")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class DatasetPublic(StoredFilePublic):
    """An uploaded dataset, validated from its headers before it was stored."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": DATASET_ID, "name": "calibration.npz", "format": "npz", "size_bytes": 803072, "sha256": SHA256,
        "num_samples": 256, "has_labels": True, "created_at": CREATED,
        "info": {"arrays": {"input": {"shape": [256, 784], "dtype": "float32"},
                            "labels": {"shape": [256], "dtype": "int64"}}}}]})

    num_samples: int = Field(description="samples (the arrays' first dimension, or the jsonl lines)")
    has_labels: bool = Field(description="whether it holds class labels (`labels` array or jsonl `label`)")
    created_at: datetime = Field(description="when it was uploaded")
    info: dict[str, Any] = Field(description="`arrays` (name -> shape and dtype); for labelled jsonl `num_labels` "
                                             "and `label_counts`")


class DatasetsPublic(BaseModel):
    """A page of datasets, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [], "next_cursor": None}]})

    data: list[DatasetPublic] = Field(description="the datasets on this page")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class PresetPublic(BaseModel):
    """A named recipe a job can use with `"preset": name`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "int8-cpu", "description": "int8 with per-channel weights for ONNX Runtime on CPU ...", "needs": [],
        "recipe": {"steps": [{"op": "quantize", "method": "auto", "dtype": "int8", "granularity": "per_channel"}]},
        "min_fidelity": None}]})

    name: str = Field(description="what a job gives as `preset`")
    description: str = Field(description="what it does, and what it trades")
    needs: list[str] = Field(description="dataset roles a job with this preset must give")
    recipe: dict[str, Any] = Field(description="its recipe, with the fields it sets (the rest are defaults)")
    min_fidelity: float | None = Field(description="its fidelity floor, where it knowingly trades fidelity; null: "
                                                   "the default 0.9")


class PresetsPublic(BaseModel):
    """Every preset."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": []}]})

    data: list[PresetPublic] = Field(description="the presets")


class HealthPublic(BaseModel):
    """The process is alive."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: Literal["ok"] = Field(description="always `ok`")


class ReadinessPublic(BaseModel):
    """Whether the service can work: its database, broker and artifact storage answer."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"status": "ready", "checks": {"database": "ok", "broker": "ok", "storage": "ok"},
         "queues_without_workers": ["gpu"]},
        {"status": "unavailable", "checks": {"database": "ok", "broker": "unavailable: OperationalError",
                                             "storage": "ok"}, "queues_without_workers": []}]})

    status: Literal["ready", "unavailable"] = Field(description="`ready` (200) or `unavailable` (503)")
    checks: dict[str, str] = Field(description="per dependency: `ok`, or `unavailable: <error class>`")
    queues_without_workers: list[str] | None = Field(
        description="the queues no worker has served lately (their jobs wait, then fail `no_worker`); it never makes "
                    "the service unready; null when the database cannot say")


class KeyCreate(StrictModel):
    """A new API key's optional label and expiry."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "ci", "expires_at": "2027-01-31T12:00:00Z"}]})

    name: Name | None = Field(default=None, description="a label for the key")
    expires_at: AwareDatetime | None = Field(
        default=None, description="when the key stops working: an RFC 3339 date-time with offset, in the future and "
                                  "at most 365 days ahead; a key with an expiry cannot create, rotate or revoke keys")

    @field_validator("expires_at", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        if value is not None and not (isinstance(value, str) and _RFC3339.fullmatch(value)):
            raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2030-01-31T12:00:00Z")
        return value

    @field_validator("expires_at")
    @classmethod
    def _ahead(cls, value: datetime | None) -> datetime | None:
        now = datetime.now(UTC)
        if value is not None and value <= now:
            raise ValueError("must be in the future")
        if value is not None and value > now + MAX_KEY_LIFETIME:
            raise ValueError(f"must be at most {MAX_KEY_LIFETIME.days} days ahead")
        return value


class KeyRotate(StrictModel):
    """How long the key being replaced keeps working."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"grace_seconds": 3600}]})

    grace_seconds: int = Field(default=0, ge=0, le=MAX_GRACE_SECONDS,
                               description="how long the old key keeps working; 0 revokes it at once")


class KeyPublic(BaseModel):
    """An API key as listed: never its secret or hash."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": KEY_ID, "prefix": "3f9a1c2b4d5e", "name": "ci", "created_at": CREATED, "last_used_at": FINISHED,
        "revoked_at": None, "expires_at": None, "active": True}]})

    id: str = Field(description="the key's id (not the key)")
    prefix: str = Field(description="the part after `mp_` that identifies the key in logs and lists")
    name: str | None = Field(description="its label")
    created_at: datetime = Field(description="when it was created")
    last_used_at: datetime | None = Field(description="updated at most once a minute")
    revoked_at: datetime | None = Field(description="when it was revoked")
    expires_at: datetime | None = Field(description="when a key rotated with a grace period stops working")
    active: bool = Field(description="whether it authenticates now (not revoked, not expired)")


class KeyCreated(KeyPublic):
    """A new key, with its secret: shown in this response only."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": KEY_ID, "prefix": "3f9a1c2b4d5e", "name": "ci", "created_at": CREATED, "last_used_at": None,
        "revoked_at": None, "expires_at": None, "active": True,
        "key": "mp_3f9a1c2b4d5e_q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1c"}]})

    key: str = Field(description="the API key; shown only in this response")


class KeysPublic(BaseModel):
    """A page of the tenant's keys, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [], "next_cursor": None}]})

    data: list[KeyPublic] = Field(description="the keys on this page, revoked and expired ones included")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class WebhookSecretPublic(BaseModel):
    """The secret that signs the tenant's webhooks."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "previous_expires_at": None}]})

    secret: str = Field(description="`whsec_` + base64 of 32 random bytes; the base64 part, decoded, is the HMAC "
                                    "key of `webhook-signature`")
    previous_expires_at: datetime | None = Field(description="until when the secret replaced by the last rotation "
                                                             "still signs beside this one")


class WebhookAttemptPublic(BaseModel):
    """One try at delivering a webhook event."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"attempted_at": FINISHED, "status_code": 200, "error": None, "duration_ms": 84}]})

    attempted_at: datetime = Field(description="when it was sent")
    status_code: int | None = Field(description="the endpoint's HTTP status; null when it gave none")
    error: str | None = Field(description="why the attempt failed (timeout, refused target, redirect, status)")
    duration_ms: int = Field(description="how long the endpoint took to answer")


class WebhookDeliveryPublic(BaseModel):
    """One webhook event (`id` is the `webhook-id` header of every attempt) and its attempts, oldest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": EVENT_ID, "type": "job.succeeded", "job_id": JOB_ID, "url": "https://hooks.example.com/modelpress",
        "status": "delivered", "attempt_count": 1, "next_attempt_at": None, "last_status_code": 200,
        "last_error": None, "created_at": FINISHED, "delivered_at": FINISHED,
        "attempts": [{"attempted_at": FINISHED, "status_code": 200, "error": None, "duration_ms": 84}]}]})

    id: str = Field(description="the event id, sent as `webhook-id` on every attempt")
    type: str = Field(description="`job.succeeded`, `job.failed` or `job.cancelled`")
    job_id: str = Field(description="the job that ended")
    url: str = Field(description="the job's `webhook_url`")
    status: str = Field(description="pending | delivered | failed")
    attempt_count: int = Field(description="attempts so far")
    next_attempt_at: datetime | None = Field(description="when a pending event is tried next")
    last_status_code: int | None = Field(description="the endpoint's status on the last attempt")
    last_error: str | None = Field(description="why the last attempt failed")
    created_at: datetime = Field(description="when the event was written (with the job's final state)")
    delivered_at: datetime | None = Field(description="when an attempt got a 2xx")
    attempts: list[WebhookAttemptPublic] = Field(description="every attempt, oldest first")


class WebhookDeliveriesPublic(BaseModel):
    """A page of the tenant's webhook events, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [], "next_cursor": None}]})

    data: list[WebhookDeliveryPublic] = Field(description="the events on this page")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class JobWebhookDeliveriesPublic(BaseModel):
    """A job's webhook event, if it has one."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": []}]})

    data: list[WebhookDeliveryPublic] = Field(description="none without a `webhook_url`, or before the job ended")
