"""Job request and response bodies."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from app.presets import preset_recipe
from app.schemas.recipe import DatasetRefs, Recipe, StrictModel, Target, TuneSpec, check_recipe_for_target


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
