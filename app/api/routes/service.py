"""Service endpoints: liveness, readiness (database, broker and storage reachable; queues no worker serves),
Prometheus metrics."""

import hmac
from datetime import timedelta

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.api.errors import error_responses
from app.api.guard import bearer_token
from app.api.schemas import HealthPublic, ReadinessPublic
from app.core import presence
from app.core.db import utcnow
from app.core.errors import ErrorCode, ServiceError
from app.core.queue import check_broker

router = APIRouter(tags=["service"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> dict:
    """The process is alive (it checks nothing else)."""
    return {"status": "ok"}


def _check_database(request: Request) -> None:
    with request.app.state.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _queues_without_workers(request: Request) -> list[str] | None:
    """None when the database cannot say (unreachable, or not migrated yet)."""
    timeout = request.app.state.settings.heartbeat_timeout
    try:
        with request.app.state.session_factory() as session:
            return presence.unserved(presence.last_served(session), utcnow() - timedelta(seconds=timeout))
    except SQLAlchemyError:
        return None


@router.get("/readyz", response_model=ReadinessPublic,
            responses={503: {"model": ReadinessPublic, "description": "a dependency is unavailable"}})
async def readyz(request: Request) -> JSONResponse:
    """503 unless the database, broker and storage answer. `queues_without_workers` lists the queues no worker
    serves (their jobs wait, then fail `no_worker`); it never makes the API unready: the API itself works."""
    checks = {}
    for name, check in (("database", _check_database), ("broker", lambda r: check_broker(r.app.state.celery)),
                        ("storage", lambda r: r.app.state.storage.check())):
        try:
            await run_in_threadpool(check, request)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {exc.__class__.__name__}"
    ready = all(v == "ok" for v in checks.values())
    unserved = await run_in_threadpool(_queues_without_workers, request) if checks["database"] == "ok" else None
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks,
                         "queues_without_workers": unserved}, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse, responses=error_responses(401))
def metrics(request: Request) -> Response:
    """Prometheus text. With MODELPRESS_METRICS_TOKEN set, only for `Authorization: Bearer <that token>`."""
    token = request.app.state.settings.metrics_token
    if token:
        given = bearer_token(request.headers.get("authorization")) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ServiceError(ErrorCode.UNAUTHORIZED,
                               "metrics need 'Authorization: Bearer <MODELPRESS_METRICS_TOKEN>'",
                               {"WWW-Authenticate": "Bearer"})
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
