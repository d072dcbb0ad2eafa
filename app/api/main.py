"""create_app: the FastAPI application. Never imports torch, onnxruntime or transformers."""

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi_offline import FastAPIOffline

from app.api.errors import error_responses, install_error_handlers
from app.api.event_stream import EventFeed
from app.api.guard import BodyGuard
from app.api.housekeeping import Housekeeper
from app.api.key_cache import KeyCache
from app.api.limits import make_rate_limiter, make_stream_slots
from app.api.observability import Metrics, MetricsMiddleware
from app.api.poll_fast_path import PollFastPath
from app.api.response_cache import ResponseCache
from app.api.routes import artifacts, datasets, events, jobs, keys, models, presets, service, ui, webhooks
from app.core.config import Settings, get_settings
from app.core.db import make_engine, make_session_factory
from app.core.queue import make_celery
from app.core.storage import open_storage

DOCS_ASSETS = "/docs-assets"
DESCRIPTION = """Model compression as a service: upload a model, submit a recipe, download a smaller, faster model
with a report of what was gained and lost.

Every `/v1` route takes an API key: `Authorization: Bearer mp_...`. Errors are `{"error": {"code", "message"}}`
with the code's HTTP status; the message names the field at fault. Lists take `?limit=` (1-200, default 50) and
`?cursor=` and answer `{"data": [...], "next_cursor"}`."""
TAGS = [
    {"name": "models", "description": "Upload models (`.pt2`, `.onnx`, Hugging Face archives); a worker inspects "
                                      "each one and marks it `ready` or `invalid`."},
    {"name": "datasets", "description": "Upload datasets (`.npz`, `.safetensors`, `.jsonl`) to calibrate, train "
                                        "and judge jobs on."},
    {"name": "jobs", "description": "Submit compression jobs (a recipe, a preset or a tuning search), follow them, "
                                    "read their reports and artifacts; `dry_run` shows the plan first."},
    {"name": "events", "description": "Job events as Server-Sent Events (`status`, `progress`, `end`), resumable "
                                      "with `Last-Event-ID`."},
    {"name": "artifacts", "description": "Download what a job produced: the compressed model and its report."},
    {"name": "presets", "description": "Named recipes for common goals."},
    {"name": "keys", "description": "The tenant's API keys: create, rotate, revoke."},
    {"name": "webhooks", "description": "The secret that signs job webhooks, and their deliveries."},
    {"name": "service", "description": "Liveness, readiness and Prometheus metrics (no API key)."},
]


def create_app(settings: Settings | None = None, *, housekeeping: bool = True) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings.resolved_database_url())
    session_factory = make_session_factory(engine)
    celery = make_celery(settings)
    housekeeper = Housekeeper(session_factory, celery, settings) if housekeeping else None

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if housekeeper:
            housekeeper.start()
        yield
        if housekeeper:
            housekeeper.stop()
        engine.dispose()

    # /docs (Swagger UI) and /redoc with their scripts, styles and icon served by this service from the
    # fastapi-offline package under DOCS_ASSETS: the pages work with no internet.
    app = FastAPIOffline(title="modelpress", version="1.0", lifespan=lifespan, description=DESCRIPTION,
                         static_url=DOCS_ASSETS, openapi_tags=TAGS,
                         # operation ids are the route functions' names: `create_job`, not
                         # `create_job_v1_jobs_post` (generated clients name their functions after them)
                         generate_unique_id_function=lambda route: route.name,
                         swagger_ui_parameters={"validatorUrl": None})
    # Browsers ask for /favicon.ico on their own; it is the icon the docs pages name.
    app.add_api_route("/favicon.ico", lambda: RedirectResponse(f"{DOCS_ASSETS}/favicon.png", status_code=308),
                      include_in_schema=False)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = session_factory
    app.state.celery = celery
    app.state.storage = open_storage(settings.resolved_storage_url())
    app.state.metrics = Metrics(session_factory)
    app.state.rate_limiter = make_rate_limiter(settings)
    app.state.key_cache = KeyCache(settings.auth_cache_seconds)
    app.state.response_cache = ResponseCache(settings.response_cache_bytes)
    app.state.stream_slots = make_stream_slots(settings)
    app.state.event_feed = EventFeed(session_factory, settings.event_poll_interval, settings.event_gap_wait)
    install_error_handlers(app)
    app.include_router(service.router)
    app.include_router(ui.router)
    # Every /v1 route authenticates (401), is rate limited (429), validates its input (422) and needs the
    # database (503); route-specific errors are declared on the routes.
    for router in (models.router, datasets.router, jobs.router, events.router, artifacts.router, presets.router,
                   keys.router, webhooks.router):
        app.include_router(router, responses=error_responses(401, 422, 429, 503))
    # Inside the metrics middleware (their answers are counted): status polls answered before routing, and the key
    # checked before any body is read.
    app.add_middleware(PollFastPath, engine=engine, key_cache=app.state.key_cache,
                       response_cache=app.state.response_cache, rate_limiter=app.state.rate_limiter)
    app.add_middleware(BodyGuard, max_bytes=settings.max_json_bytes, session_factory=session_factory,
                       key_cache=app.state.key_cache)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return app
