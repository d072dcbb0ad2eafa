"""Which queues some worker serves, from the database: works alike on Redis and the embedded filesystem broker.

Every worker process writes, every `heartbeat_interval`, the time it served each of its queues (one row per queue,
the last writer wins). A queue is served while that time is younger than `heartbeat_timeout`, so a worker that
restarts within it never leaves its queue unserved, and one killed outright stops counting once it passes. The
API reads this for /readyz, for the message of a job that waits on a queue nobody serves, and to fail such a job
with `no_worker` once it has waited `queue_timeout` (app.api.housekeeping).
"""

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.core.queue import Queue
from app.core.tables import QueueHeartbeat


def record(session: Session, worker_id: str, queues: Iterable[str]) -> None:
    """Say that `worker_id` serves `queues` now. Two workers adding the same new queue at once: one insert fails
    with an IntegrityError, and that worker's next beat updates the row."""
    now = utcnow()
    for queue in queues:
        updated = session.execute(update(QueueHeartbeat).where(QueueHeartbeat.queue == queue)
                                  .values(worker_id=worker_id, seen_at=now)
                                  .execution_options(synchronize_session=False))
        if updated.rowcount == 0:
            session.add(QueueHeartbeat(queue=queue, worker_id=worker_id, seen_at=now))
    session.flush()


def last_served(session: Session) -> dict[str, datetime]:
    """Queue -> when a worker last said it serves it (queues no worker ever served are absent)."""
    return {queue: seen_at for queue, seen_at in session.execute(select(QueueHeartbeat.queue, QueueHeartbeat.seen_at))}


def unserved(served: dict[str, datetime], since: datetime) -> list[str]:
    """The service's queues that no worker has served since `since`, in the order of `Queue`."""
    return [queue.value for queue in Queue if served.get(queue.value) is None or served[queue.value] < since]
