"""Opaque, time-ordered ids: sorting by id is sorting by creation time, which keyset pagination relies on."""

import secrets
import time
from datetime import UTC, datetime


def new_id(prefix: str) -> str:
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def minted_at(resource_id: str) -> datetime | None:
    """When an id was minted (its first 12 hex digits are the creation time in milliseconds)."""
    try:
        return datetime.fromtimestamp(int(resource_id.split("_", 1)[1][:12], 16) / 1000, UTC)
    except (IndexError, ValueError):
        return None
