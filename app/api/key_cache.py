"""Recently verified API keys, so that a poll does not cost a database round trip to authenticate.

An entry lives `ttl` seconds (MODELPRESS_AUTH_CACHE_SECONDS). Revoking or rotating a key through this process
empties its cache at once; another API process (or `modelpress keys revoke`) stops the key within `ttl` seconds
at most. A key's own expiry (a rotation's grace period) is checked on every use. Only a sha256 of the key is held.
"""

import hashlib
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from app.core.db import utcnow

MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant (`id`, as the routes read `tenant.id`) and the key it used."""

    id: str
    key_id: str


class KeyCache:
    def __init__(self, ttl: float):
        self.ttl = ttl
        self._entries: dict[str, tuple[Caller, float, datetime | None]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def lookup(self, key: str) -> Caller | None:
        """The caller of a key verified less than `ttl` seconds ago and not expired since; else None."""
        if self.ttl <= 0:
            return None
        entry = self._entries.get(self._digest(key))
        if entry is None:
            return None
        caller, verified_at, expires_at = entry
        if time.monotonic() - verified_at > self.ttl or (expires_at is not None and expires_at <= utcnow()):
            return None
        return caller

    def store(self, key: str, caller: Caller, expires_at: datetime | None) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()  # a flood of distinct keys costs lookups, never memory
            self._entries[self._digest(key)] = (caller, time.monotonic(), expires_at)

    def clear(self) -> None:
        """Forget every key: called when this process revokes or rotates one."""
        with self._lock:
            self._entries.clear()
