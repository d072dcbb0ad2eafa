"""Per-process resources of a worker. Created lazily after Celery forks its pool, never shared across forks."""

import os
import socket
from functools import lru_cache

from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings, get_settings
from app.core.db import make_engine, make_session_factory
from app.core.storage import Storage, open_storage


@lru_cache
def _resources(pid: int) -> tuple[Settings, sessionmaker[Session], Storage]:
    settings = get_settings()
    factory = make_session_factory(make_engine(settings.resolved_database_url()))
    return settings, factory, open_storage(settings.resolved_storage_url())


def settings() -> Settings:
    return _resources(os.getpid())[0]


def session_factory() -> sessionmaker[Session]:
    return _resources(os.getpid())[1]


def storage() -> Storage:
    return _resources(os.getpid())[2]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
