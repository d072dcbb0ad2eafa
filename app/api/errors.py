"""The service's error shape and one place that turns every failure into it (no stack trace ever leaves).

Codes and their statuses come from the one catalogue, app.core.errors."""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.constants import REF_PREFIX
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.core.errors import HTTP_STATUS, ErrorCode, ServiceError
from app.core.storage import StorageError

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    """What went wrong."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"code": "not_found", "message": "model_id: model 'mdl_0193a1b2c3d4e5f60718293a' not found"}]})

    code: str = Field(description="one of the service's error codes, snake_case (docs/api.md, Errors)")
    message: str = Field(description="for people: what is wrong, naming the field at fault")


class ErrorBody(BaseModel):
    """Every error response: `{"error": {"code", "message"}}`."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": {"code": "invalid_request", "message": "recipe.steps.0.quantize.dtype: Input should be 'int8', "
                                                         "'int4', 'fp16' or 'bf16'"}}]})

    error: ErrorDetail = Field(description="the error's code and message")


_DESCRIPTIONS = {400: "Bad request (malformed body, cursor or multipart)",
                 401: "Missing, invalid or revoked API key",
                 404: "Not found (another tenant's resources are reported as not found too)",
                 409: "Conflict with the resource's state",
                 413: "Too large, or past the tenant's storage quota (`quota_exceeded`)",
                 415: "Unsupported format or media type",
                 416: "Range not satisfiable",
                 422: "Invalid body or parameters (the message names the field)",
                 429: "Rate limited (`rate_limited`, with Retry-After in seconds) or too many jobs (`too_many_jobs`)",
                 503: "A dependency (database, broker, storage) is unavailable"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for error statuses, so clients and schema checks know every answer. The JSON
    content is named outright: FastAPI would give the error body the media type of the route's own response
    class, which for the event streams is `text/event-stream`."""
    json_body = {"application/json": {"schema": {"$ref": f"{REF_PREFIX}ErrorBody"}}}
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status], "content": json_body}
            for status in statuses}


def error_response(code: ErrorCode, message: str, headers: dict[str, str] | None = None, *,
                   status_code: int | None = None) -> JSONResponse:
    """The error body; the status is the code's own unless a framework error says otherwise."""
    return JSONResponse({"error": {"code": code, "message": message}}, headers=headers,
                        status_code=status_code or HTTP_STATUS[code])


def describe_validation_error(exc: RequestValidationError) -> str:
    """`recipe.steps.0.dtype: Input should be 'int8', 'int4', 'fp16' or 'bf16'` — the field first, then why."""
    parts = []
    for err in exc.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        # Discriminated unions add the tag as a path element ("quantize"); it is not a field name.
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        # Cross-field validators name their own field ("datasets.calibration: ..."): keep that as it is.
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return "; ".join(parts) or "invalid request"


# Errors raised by Starlette itself (no route, wrong method, ...) carry only a status: the code it gets.
_CODE_FOR_STATUS = {400: ErrorCode.BAD_REQUEST, 401: ErrorCode.UNAUTHORIZED, 404: ErrorCode.NOT_FOUND,
                    405: ErrorCode.METHOD_NOT_ALLOWED, 409: ErrorCode.CONFLICT, 413: ErrorCode.TOO_LARGE,
                    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE, 422: ErrorCode.INVALID_REQUEST,
                    429: ErrorCode.RATE_LIMITED, 503: ErrorCode.UNAVAILABLE}


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method the path takes: Starlette's 405 names only those of the first route whose path matched,
    so `OPTIONS /v1/models/{id}` said `Allow: GET` although DELETE works there too.

    Each method is asked of the router as a request would be (`matches` on a scope with that method), because the
    top-level routes are not all endpoints: FastAPI keeps an included router as one entry with no `methods`,
    which left `Allow` empty."""
    scope = {"type": "http", "path": request.scope["path"], "root_path": request.scope.get("root_path", ""),
             "headers": request.scope.get("headers", [])}
    allowed = [method for method in _METHODS
               if any(route.matches({**scope, "method": method})[0] == Match.FULL
                      for route in request.app.router.routes)]
    return ", ".join(allowed)


def _malformed_json(exc: RequestValidationError) -> str | None:
    """FastAPI reports a body that is not JSON as a validation error at the byte offset: say what and where."""
    error = next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)
    if error is None:
        return None
    offset = error.get("loc", (None, None))[-1]
    what = (error.get("ctx") or {}).get("error") or "invalid JSON"
    doc = exc.body if isinstance(exc.body, str) else None
    if isinstance(offset, int) and doc is not None:
        line = doc.count("\n", 0, offset) + 1
        column = offset - doc.rfind("\n", 0, offset)
        return f"malformed JSON body: {what} at line {line}, column {column}"
    return f"malformed JSON body: {what}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        malformed = _malformed_json(exc)
        if malformed is not None:
            return error_response(ErrorCode.BAD_REQUEST, malformed)
        return error_response(ErrorCode.INVALID_REQUEST, describe_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        fallback = ErrorCode.INTERNAL_ERROR if exc.status_code >= 500 else ErrorCode.BAD_REQUEST
        code = _CODE_FOR_STATUS.get(exc.status_code, fallback)
        message = exc.detail if isinstance(exc.detail, str) else code
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return error_response(code, message, headers, status_code=exc.status_code)

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc.orig)
        return error_response(ErrorCode.DATABASE_UNAVAILABLE, "the database is unavailable, try again shortly",
                              {"Retry-After": "5"})

    @app.exception_handler(StorageError)
    async def _storage_down(_: Request, exc: StorageError) -> JSONResponse:
        log.warning("storage error: %s", exc)
        return error_response(ErrorCode.STORAGE_UNAVAILABLE, "artifact storage is unavailable, try again shortly",
                              {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return error_response(ErrorCode.DATABASE_UNAVAILABLE, "the database is unavailable, try again shortly")
        log.exception("unhandled error")
        return error_response(ErrorCode.INTERNAL_ERROR, "internal error")
