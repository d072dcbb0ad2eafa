"""The Celery application as both halves see it: the API only sends by task name, the worker registers tasks.

The broker carries nothing but "run job X" / "inspect model Y"; the database holds the truth.
"""

from enum import StrEnum

import kombu
from celery import Celery

from app.core.config import Settings


class TaskName(StrEnum):
    RUN_JOB = "modelpress.run_job"
    INSPECT_MODEL = "modelpress.inspect_model"


class Queue(StrEnum):
    """CPU work, and CUDA jobs, which only workers with a GPU consume."""

    CPU = "cpu"
    GPU = "gpu"

    @classmethod
    def for_device(cls, device: str) -> "Queue":
        return cls.GPU if device == "cuda" else cls.CPU

    @classmethod
    def parse_list(cls, text: str) -> list["Queue"]:
        """`cpu,gpu` -> queues; ValueError naming what is unknown."""
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = sorted(set(names) - {q.value for q in cls})
        if unknown or not names:
            raise ValueError(f"unknown queue(s) {unknown}; queues are {', '.join(q.value for q in cls)}")
        return [cls(name) for name in dict.fromkeys(names)]


def make_celery(settings: Settings, include: list[str] | None = None) -> Celery:
    """The app both halves configure alike; the worker passes its task modules in `include`."""
    broker_url = settings.resolved_broker_url()
    transport_options: dict = {}
    if broker_url.startswith("filesystem://"):
        folder = settings.broker_folder()
        for sub in ("processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {"data_folder_in": str(folder), "data_folder_out": str(folder),
                             "processed_folder": str(folder / "processed"), "store_processed": False,
                             "control_folder": str(folder / "control"),
                             # the default 1 s poll caps a filesystem queue at one message a second
                             "polling_interval": 0.05}
    elif broker_url.startswith(("redis://", "rediss://")):
        # An unacked message comes back after the visibility timeout; keep it longer than any job may run.
        transport_options = {"visibility_timeout": settings.job_time_limit + 600,
                             "socket_connect_timeout": 2, "socket_timeout": 5}
    celery = Celery("modelpress", broker=broker_url, include=include or [])
    celery.conf.update(
        broker_transport_options=transport_options,
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        task_queues=[kombu.Queue(queue.value) for queue in Queue],
        task_default_queue=Queue.CPU.value,
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        # A send that fails is not retried for long here: the job stays queued and the dispatcher re-sends it.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5,
                                   "interval_max": 0.5},
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return celery


def send_job(celery: Celery, job_id: str, queue: str) -> None:
    celery.send_task(TaskName.RUN_JOB, args=[job_id], queue=queue)


def send_inspection(celery: Celery, model_id: str) -> None:
    celery.send_task(TaskName.INSPECT_MODEL, args=[model_id], queue=Queue.CPU)


def check_broker(celery: Celery) -> None:
    """Raise if the broker cannot be reached (used by /readyz)."""
    with celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
