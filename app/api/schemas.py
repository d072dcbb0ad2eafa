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


class JobCreate(StrictModel):
    model_id: Id
    name: Name | None = None
    recipe: Recipe | None = None
    preset: PresetName | None = None
    tune: TuneSpec | None = None
    datasets: DatasetRefs = Field(default_factory=DatasetRefs)
    target: Target = Field(default_factory=Target)
    webhook_url: HttpUrl | None = None
    # The final model's output cosine must reach this (default 0.9, or the preset's), else the job fails with
    # `fidelity_collapse`; `accept_degraded` lets such a job succeed, marked `degraded`.
    min_fidelity: float | None = Field(default=None, ge=0.0, le=1.0)
    accept_degraded: bool = False
    # Per input name: how to make or read it (app.core.input_specs); over the model's own, per input.
    input_specs: InputSpecs | None = None
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


class PlannedModel(BaseModel):
    id: str = Field(description="the model's id", examples=["mdl_01hx3k9v7qz8a4t2"])
    name: str = Field(description="the model's name", examples=["resnet18.onnx"])
    format: str = Field(description="`pt2`, `onnx` or `hf`", examples=["onnx"])
    status: str = Field(description="`ready`, or `uploaded` while a worker inspects it (its inputs are then "
                                    "unknown: datasets and input specs are checked by the worker)",
                        examples=["ready"])


class PlannedDataset(BaseModel):
    """One dataset of the job, the role it plays and whether its arrays fit the model's inputs."""

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
    name: str = Field(description="the queue the job is sent to: `cpu`, or `gpu` for `target.device: cuda`",
                      examples=["cpu"])
    workers: Literal["available", "none", "unknown"] = Field(
        description="whether a worker consumes that queue now: `none` means the job would wait `queued` until one "
                    "starts; `unknown` when the broker cannot tell (unreachable)")
    worker_names: list[str] = Field(description="the workers that answered for this queue",
                                    examples=[["cpu-4242@host"]])


class PlannedTuning(BaseModel):
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
    fraction: float
    step: str | None
    message: str | None


class JobError(BaseModel):
    code: str
    message: str


class ArtifactPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str
    format: str
    filename: str
    size_bytes: int
    sha256: str


class JobPublic(BaseModel):
    id: str
    name: str | None
    model_id: str
    status: str
    recipe: dict[str, Any] | None
    tune: dict[str, Any] | None
    datasets: dict[str, Any]
    target: dict[str, Any]
    webhook_url: str | None
    min_fidelity: float | None
    accept_degraded: bool
    input_specs: dict[str, Any] | None
    progress: Progress
    error: JobError | None
    metrics: dict[str, Any] | None
    artifacts: list[ArtifactPublic]
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobsPublic(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]


class StoredFilePublic(BaseModel):
    """What every uploaded file shows (models and datasets, as app.core.tables.StoredFile)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str


class ModelPublic(StoredFilePublic):
    status: str
    error: str | None
    created_at: datetime
    info: dict[str, Any] | None
    input_specs: dict[str, Any] | None


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    next_cursor: str | None


class DatasetPublic(StoredFilePublic):
    num_samples: int
    has_labels: bool
    created_at: datetime
    info: dict[str, Any]


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    next_cursor: str | None


class KeyCreate(StrictModel):
    name: Name | None = None
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
    grace_seconds: int = Field(default=0, ge=0, le=MAX_GRACE_SECONDS,
                               description="how long the old key keeps working; 0 revokes it at once")


class KeyPublic(BaseModel):
    id: str
    prefix: str
    name: str | None
    created_at: datetime
    last_used_at: datetime | None = Field(description="updated at most once a minute")
    revoked_at: datetime | None
    expires_at: datetime | None = Field(description="when a key rotated with a grace period stops working")
    active: bool


class KeyCreated(KeyPublic):
    key: str = Field(description="the API key; shown only in this response")


class KeysPublic(BaseModel):
    data: list[KeyPublic]
    next_cursor: str | None


class WebhookSecretPublic(BaseModel):
    secret: str = Field(description="`whsec_` + base64 of 32 random bytes; the base64 part, decoded, is the HMAC "
                                    "key of `webhook-signature`")
    previous_expires_at: datetime | None = Field(description="until when the secret replaced by the last rotation "
                                                             "still signs beside this one")


class WebhookAttemptPublic(BaseModel):
    attempted_at: datetime
    status_code: int | None = Field(description="the endpoint's HTTP status; null when it gave none")
    error: str | None = Field(description="why the attempt failed (timeout, refused target, redirect, status)")
    duration_ms: int


class WebhookDeliveryPublic(BaseModel):
    """One webhook event (`id` is the `webhook-id` header of every attempt) and its attempts, oldest first."""

    id: str
    type: str
    job_id: str
    url: str
    status: str = Field(description="pending | delivered | failed")
    attempt_count: int
    next_attempt_at: datetime | None = Field(description="when a pending event is tried next")
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    attempts: list[WebhookAttemptPublic]


class WebhookDeliveriesPublic(BaseModel):
    data: list[WebhookDeliveryPublic]
    next_cursor: str | None


class JobWebhookDeliveriesPublic(BaseModel):
    data: list[WebhookDeliveryPublic]
