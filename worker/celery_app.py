"""The worker's Celery app: the shared configuration, with the task modules listed in `include` (tasks are
declared with `shared_task`, so this module and the task modules never import each other). Once the worker
consumes, its main process announces the queues it serves (worker.announce) until it shuts down.

Run with `modelpress worker` (or `celery -A worker.celery_app worker -Q cpu`).
"""

from celery.signals import worker_ready, worker_shutdown

from app.core.config import get_settings
from app.core.queue import make_celery
from worker.announce import Announcer

celery = make_celery(get_settings(), include=["worker.tasks"])
_announcers: list[Announcer] = []


@worker_ready.connect
def _announce_queues(sender, **_) -> None:
    """`sender` is the worker's consumer: its hostname and the queues given with -Q."""
    announcer = Announcer(get_settings(), sender.hostname, sorted(sender.app.amqp.queues.consume_from))
    announcer.start()
    _announcers.append(announcer)


@worker_shutdown.connect
def _stop_announcing(**_) -> None:
    while _announcers:
        _announcers.pop().stop()
