"""Job request and response bodies."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from app.schemas.recipe import DatasetRefs, Recipe, StrictModel, Target, check_recipe_for_target


class JobCreate(StrictModel):
    model_id: str = Field(min_length=1, max_length=40)
    name: str | None = Field(default=None, max_length=200)
    recipe: Recipe
    datasets: DatasetRefs = Field(default_factory=DatasetRefs)
    target: Target = Field(default_factory=Target)
    webhook_url: HttpUrl | None = None

    @model_validator(mode="after")
    def _recipe_fits_target(self) -> "JobCreate":
        check_recipe_for_target(self.recipe, self.target, self.datasets)
        return self


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
    recipe: dict[str, Any]
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
