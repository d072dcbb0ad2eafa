"""Opaque, time-ordered ids: sorting by id is sorting by creation time, which keyset pagination relies on."""

import secrets
import time


def new_id(prefix: str) -> str:
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"
