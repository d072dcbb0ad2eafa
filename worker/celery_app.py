"""The worker's Celery app: the shared configuration, with the task modules listed in `include` (tasks are
declared with `shared_task`, so this module and the task modules never import each other).

Run with `modelpress worker` (or `celery -A worker.celery_app worker -Q cpu`).
"""

from app.core.config import get_settings
from app.core.queue import make_celery

celery = make_celery(get_settings(), include=["worker.tasks"])
