"""create_app: the FastAPI application. Never imports torch, onnxruntime or transformers."""

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.errors import error_responses, install_error_handlers
from app.api.event_stream import EventFeed
from app.api.guard import BodyGuard
from app.api.housekeeping import Housekeeper
from app.api.limits import make_rate_limiter, make_stream_slots
from app.api.observability import Metrics, MetricsMiddleware
from app.api.routes import artifacts, datasets, events, jobs, keys, models, presets, service, webhooks
from app.core.config import Settings, get_settings
from app.core.db import make_engine, make_session_factory
from app.core.queue import make_celery
from app.core.storage import open_storage


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

    app = FastAPI(title="modelpress", version="1.0", lifespan=lifespan,
                  description="Model compression as a service: upload a model, submit a recipe, "
                              "download a smaller, faster model with a report of what was gained and lost.")
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = session_factory
    app.state.celery = celery
    app.state.storage = open_storage(settings.resolved_storage_url())
    app.state.metrics = Metrics(session_factory)
    app.state.rate_limiter = make_rate_limiter(settings)
    app.state.stream_slots = make_stream_slots(settings)
    app.state.event_feed = EventFeed(session_factory, settings.event_poll_interval, settings.event_gap_wait)
    install_error_handlers(app)
    app.include_router(service.router)
    # Every /v1 route authenticates (401), is rate limited (429), validates its input (422) and needs the
    # database (503); route-specific errors are declared on the routes.
    for router in (models.router, datasets.router, jobs.router, events.router, artifacts.router, presets.router,
                   keys.router, webhooks.router):
        app.include_router(router, responses=error_responses(401, 422, 429, 503))
    # Inside the metrics middleware (its 401/413/400 answers are counted): the key before any body is read.
    app.add_middleware(BodyGuard, max_bytes=settings.max_json_bytes, session_factory=session_factory)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return app
