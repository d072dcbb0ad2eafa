"""Request and response bodies of the HTTP API. The recipe itself (steps, target, tuning) is the core's
contract with the workers: app.core.recipe."""

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

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
    kind: str = Field(description="model, report (format json or html) or card (format md)")
    format: str
    filename: str
    size_bytes: int
    sha256: str
    provisional: bool = Field(default=False, description="a running tune job's best trial so far, replaced by a "
                                                          "better one and by the final artifacts")


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
    # When the job's outputs were deleted (DELETE /v1/jobs/{id} or the retention period); `artifacts` is then empty.
    deleted_at: datetime | None = None


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
