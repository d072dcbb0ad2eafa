"""The last body sent for each job, by version: a poll of a job that has not changed is answered with the bytes
built for the previous one (app.api.poll_fast_path), the database still saying which version is current.

Bounded by `max_bytes` (MODELPRESS_RESPONSE_CACHE_BYTES, 0: off), least recently used out first."""

import threading
from collections import OrderedDict


class ResponseCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._bodies: OrderedDict[str, tuple[str, int, bytes]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, job_id: str, tenant_id: str, version: int) -> bytes | None:
        """The body of the job at `version` as `tenant_id` was sent it; None if not held."""
        with self._lock:
            entry = self._bodies.get(job_id)
            if entry is None or entry[0] != tenant_id or entry[1] != version:
                return None
            self._bodies.move_to_end(job_id)
            return entry[2]

    def put(self, job_id: str, tenant_id: str, version: int, body: bytes) -> None:
        if len(body) > self.max_bytes:
            return
        with self._lock:
            old = self._bodies.pop(job_id, None)
            if old is not None:
                self._size -= len(old[2])
            self._bodies[job_id] = (tenant_id, version, body)
            self._size += len(body)
            while self._size > self.max_bytes:
                _, (_, _, evicted) = self._bodies.popitem(last=False)
                self._size -= len(evicted)
