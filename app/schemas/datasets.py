"""Dataset response bodies."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    num_samples: int
    has_labels: bool
    created_at: datetime
    info: dict[str, Any]


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    next_cursor: str | None
