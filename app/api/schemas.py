"""Request and response bodies of the HTTP API. The recipe itself (steps, target, tuning) is the core's
contract with the workers: app.core.recipe."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from app.core.presets import preset_recipe
from app.core.recipe import DatasetRefs, Recipe, StrictModel, Target, TuneSpec, check_recipe_for_target

MAX_GRACE_SECONDS = 86400


class JobCreate(StrictModel):
    model_id: str = Field(min_length=1, max_length=40)
    name: str | None = Field(default=None, max_length=200)
    recipe: Recipe | None = None
    preset: str | None = Field(default=None, max_length=64)
    tune: TuneSpec | None = None
    datasets: DatasetRefs = Field(default_factory=DatasetRefs)
    target: Target = Field(default_factory=Target)
    webhook_url: HttpUrl | None = None

    @model_validator(mode="after")
    def _recipe_fits_target(self) -> "JobCreate":
        if self.preset is not None:
            if self.recipe is not None:
                raise ValueError("preset: give a recipe or a preset, not both")
            self.recipe = preset_recipe(self.preset)
        if self.recipe is None and self.tune is None:
            raise ValueError("recipe: a job needs a recipe, a preset or tune")
        for recipe in self.candidates():
            check_recipe_for_target(recipe, self.target, self.datasets)
        if self.tune is not None and self.tune.metric == "accuracy" and not self.datasets.eval:
            raise ValueError("datasets.eval: tune.metric 'accuracy' needs an eval dataset with labels")
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
    name: str | None = Field(default=None, max_length=200)


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
