"""A worker process says which queues it serves (app.core.presence), from a thread of Celery's main process, every
`heartbeat_interval`, from the moment it consumes until it stops. The API reads it: a queue no worker served for
`heartbeat_timeout` has none (its jobs say they wait, then fail `no_worker`).

Nothing is removed when the worker stops: another may serve the same queue, and the entry goes stale by itself.
The engine keeps no connection open between beats, so the pool children Celery forks never inherit one.
"""

import logging
import threading

from app.core import presence
from app.core.config import Settings
from app.core.db import make_engine, make_session_factory, session_scope

log = logging.getLogger(__name__)


class Announcer:
    def __init__(self, settings: Settings, worker_id: str, queues: list[str]):
        self.worker_id, self.queues, self.interval = worker_id, queues, settings.heartbeat_interval
        self.engine = make_engine(settings.resolved_database_url(), pooled=False)
        self.factory = make_session_factory(self.engine)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="announce-queues", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.engine.dispose()

    def beat(self) -> None:
        with session_scope(self.factory) as session:
            presence.record(session, self.worker_id, self.queues)

    def _loop(self) -> None:
        failing = False
        while True:
            try:
                self.beat()
                if failing:
                    log.info("serving queues %s is recorded again", ", ".join(self.queues))
                failing = False
            except Exception as exc:  # database down, or two new workers racing on one queue: try next beat
                if not failing:
                    log.warning("could not record that this worker serves %s: %s", ", ".join(self.queues), exc)
                failing = True
            if self._stop.wait(self.interval):
                return
