"""The lifecycle states of jobs and of uploaded models. Transitions of a job happen in app.core.jobs only."""

from enum import StrEnum


class JobStatus(StrEnum):
    """`queued` -> `running` -> `succeeded` | `failed` | `cancelled` (a queued job may be cancelled at once)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


TERMINAL = [s.value for s in JobStatus if s.is_terminal()]
ACTIVE = [s.value for s in JobStatus if not s.is_terminal()]  # queued or running: the job still needs its inputs


class ModelStatus(StrEnum):
    """`uploaded` until a worker has opened it, then `ready` (described in `info`) or `invalid` (why in `error`)."""

    UPLOADED = "uploaded"
    READY = "ready"
    INVALID = "invalid"
