"""Status polls answered before routing: `GET /v1/jobs/{id}` from a caller whose key is in the key cache.

A dashboard or script polls a job every second or two, and nearly every answer is "no change". Through the
router each one cost dependency resolution, an authentication query and a body built from the row and its
artifacts. Here it costs one narrow read of the row's tenant and version:

- `If-None-Match` names the current version: 304, not charged to the tenant's rate limit;
- the body of the current version is in the response cache: 200 with it (charged);
- anything else (unknown key, another tenant's or a missing job, a cold cache, an empty rate bucket, a database
  that does not answer) goes on to the route, which gives the same answers and fills the caches.
"""

import re

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine, bindparam, select
from sqlalchemy.exc import DBAPIError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.conditional import if_none_match_lists, version_etag
from app.api.guard import bearer_token
from app.api.key_cache import KeyCache
from app.api.limits import RateLimiter
from app.api.response_cache import ResponseCache
from app.core.tables import Job

JOB_PATH = re.compile(r"/v1/jobs/(job_[0-9a-f]{12,40})")
# Built once: SQLAlchemy then reuses its compiled form (a select built per request cost 5x the read itself).
OWNER_AND_VERSION = select(Job.tenant_id, Job.version).where(Job.id == bindparam("job_id"))


class PollFastPath:
    def __init__(self, app: ASGIApp, *, engine: Engine, key_cache: KeyCache, response_cache: ResponseCache,
                 rate_limiter: RateLimiter | None):
        self.app, self.engine = app, engine
        self.key_cache, self.response_cache, self.rate_limiter = key_cache, response_cache, rate_limiter

    def _owner_and_version(self, job_id: str) -> tuple[str, int] | None:
        """None when the job is missing or the database cannot answer: the route then says which (404 or 503)."""
        try:
            with self.engine.connect() as connection:
                row = connection.execute(OWNER_AND_VERSION, {"job_id": job_id}).first()
        except DBAPIError:
            return None
        return None if row is None else (row[0], row[1])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]:
            match = JOB_PATH.fullmatch(scope["path"])
        if match is None:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        token = bearer_token(headers.get("authorization"))
        caller = self.key_cache.lookup(token) if token else None
        if caller is None:
            return await self.app(scope, receive, send)
        job_id = match.group(1)
        found = await run_in_threadpool(self._owner_and_version, job_id)
        if found is None or found[0] != caller.id:
            return await self.app(scope, receive, send)
        etag = version_etag(found[1])
        if if_none_match_lists(headers.get("if-none-match", ""), etag):
            return await _send(send, 304, [(b"etag", etag.encode())], b"")
        body = self.response_cache.get(job_id, caller.id, found[1])
        if body is None:
            return await self.app(scope, receive, send)
        if self.rate_limiter is not None and await run_in_threadpool(self.rate_limiter.acquire, caller.id) > 0:
            return await self.app(scope, receive, send)  # the route answers 429 with its Retry-After
        await _send(send, 200, [(b"content-type", b"application/json"), (b"etag", etag.encode()),
                                (b"content-length", str(len(body)).encode())], body)


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
