"""API key request and response bodies. The secret appears once, in KeyCreated; the hash never leaves."""

from datetime import datetime

from pydantic import BaseModel, Field

from app.schemas.recipe import StrictModel

MAX_GRACE_SECONDS = 86400


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
