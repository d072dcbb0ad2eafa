"""The worker's Celery app: the shared configuration plus the task implementations.

Run with `modelpress worker` (or `celery -A worker.celery_app worker -Q cpu`).
"""

from app.config import get_settings
from app.queue import make_celery

celery = make_celery(get_settings())

from worker import tasks  # noqa: E402,F401  (registers the tasks on `celery`)
