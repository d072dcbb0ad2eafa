"""Model response bodies."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class ModelPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    status: str
    error: str | None
    created_at: datetime
    info: dict[str, Any] | None


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    next_cursor: str | None
