"""Request bodies other than uploads: the key is checked before a byte of the body is read, the body is capped at
`Settings.max_json_bytes`, and JSON must be strict JSON.

FastAPI reads and parses a route's JSON body before it solves the route's dependencies, so the key dependency
alone came too late: a client without a key could make the API hold a body of any size before its 401. This
pure ASGI middleware sits in front of the routes for every `/v1` request that carries a body, except the
multipart uploads (their routes authenticate first and stream the body to disk under their own limits):

1. no `Authorization: Bearer` key: 401 at once;
2. a key that does not authenticate: 401 (the key cache, else one indexed look-up; the route's dependency checks
   it again);
3. a declared `Content-Length` past the cap: 413 `too_large` at once;
4. the body is read, counting bytes (a chunked body is refused with 413 as soon as it passes the cap);
5. a JSON body must parse as strict JSON: `NaN`, `Infinity`, `-Infinity` and numbers too large for a float are
   400 `bad_request`, as is malformed JSON ("malformed JSON body: <what> at line L, column C");
6. the route then gets the body as if it came from the client.
"""

import json
import math
import re
from collections.abc import Callable

from fastapi.concurrency import run_in_threadpool
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import INVALID_KEY, MISSING_KEY, UNAUTHORIZED_HEADERS
from app.api.errors import error_response
from app.api.key_cache import KeyCache
from app.core import auth
from app.core.errors import ErrorCode

MULTIPART = "multipart/form-data"


def upload_routes(openapi: dict) -> list[tuple[str, re.Pattern]]:
    """(METHOD, path pattern) of the operations the OpenAPI schema documents as taking a multipart body: those
    routes authenticate first and stream and limit the body themselves."""
    found = []
    for template, operations in openapi.get("paths", {}).items():
        pattern = re.compile("[^/]+".join(re.escape(part) for part in re.split(r"\{[^}]*\}", template)))
        for method, operation in operations.items():
            content = (operation.get("requestBody") or {}).get("content") or {} if isinstance(operation, dict) else {}
            if MULTIPART in content:
                found.append((method.upper(), pattern))
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, as the key dependency reads it; None without one."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not authorization or scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


class MalformedJSON(ValueError):
    pass


def _refuse_constant(literal: str) -> float:
    raise MalformedJSON(f"{literal} is not a JSON value (numbers must be finite)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedJSON(f"the number {text[:40]} is too large")
    return value


def check_strict_json(body: bytes) -> str | None:
    """None when `body` is strict JSON (RFC 8259: finite numbers only), else what is wrong and where."""
    try:
        json.loads(body, parse_constant=_refuse_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        return f"{exc.msg} at line {exc.lineno}, column {exc.colno}"
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
    except RecursionError:
        return "nested too deeply"
    except MalformedJSON as exc:
        return str(exc)
    except ValueError:  # an integer with more digits than Python converts (sys.get_int_max_str_digits)
        return "an integer with too many digits"
    return None


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI would parse this body as JSON (no content type, application/json, application/*+json)."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class BodyGuard:
    def __init__(self, app: ASGIApp, *, max_bytes: int, session_factory: sessionmaker[Session], key_cache: KeyCache):
        self.app, self.max_bytes, self.session_factory, self.key_cache = app, max_bytes, session_factory, key_cache
        self._uploads: list[tuple[str, re.Pattern]] | None = None

    def _is_upload(self, scope: Scope) -> bool:
        if self._uploads is None:  # from the application's own schema, once
            self._uploads = upload_routes(scope["app"].openapi())
        return any(method == scope["method"] and pattern.fullmatch(scope["path"])
                   for method, pattern in self._uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == "/v1" or path.startswith("/v1/")) or self._is_upload(scope):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if "transfer-encoding" not in headers and length in (None, "0"):
            await self.app(scope, receive, send)  # no body: the route's own dependency authenticates
            return

        async def refuse(code: ErrorCode, message: str, extra: dict[str, str] | None = None) -> None:
            await error_response(code, message, extra)(scope, receive, send)

        token = bearer_token(headers.get("authorization"))
        if token is None:
            return await refuse(ErrorCode.UNAUTHORIZED, MISSING_KEY, UNAUTHORIZED_HEADERS)
        try:
            known = await run_in_threadpool(self._authenticates, token)
        except DBAPIError:
            return await refuse(ErrorCode.DATABASE_UNAVAILABLE, "the database is unavailable, try again shortly",
                                {"Retry-After": "5"})
        if not known:
            return await refuse(ErrorCode.UNAUTHORIZED, INVALID_KEY, UNAUTHORIZED_HEADERS)
        if length is not None and not length.strip().isdigit():
            return await refuse(ErrorCode.BAD_REQUEST, "Content-Length is not a number of bytes")
        if length is not None and int(length) > self.max_bytes:
            return await refuse(ErrorCode.TOO_LARGE, self._too_large(f"request body of {int(length)} bytes"))
        try:
            body = await self._read(receive)
        except _TooLarge:
            return await refuse(ErrorCode.TOO_LARGE, self._too_large("request body"))
        except _Disconnected:
            return  # the client left: nobody to answer
        if body.strip() and is_json(headers.get("content-type")):
            problem = check_strict_json(body)
            if problem is not None:
                return await refuse(ErrorCode.BAD_REQUEST, f"malformed JSON body: {problem}")
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self, what: str) -> str:
        return (f"{what} is larger than the limit of {self.max_bytes} bytes for JSON bodies "
                "(MODELPRESS_MAX_JSON_BYTES)")

    def _authenticates(self, token: str) -> bool:
        if self.key_cache.lookup(token) is not None:
            return True
        with self.session_factory() as session:
            return auth.authenticate(session, token) is not None

    async def _read(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Callable:
    """A `receive` that hands the app the body already read, then passes on what the client sends (disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
