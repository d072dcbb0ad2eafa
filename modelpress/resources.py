"""What the API returns, as typed objects. Each keeps the whole JSON in `raw`, so fields the service adds later
are not lost to a client that does not know them yet."""

from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

FINISHED = ("succeeded", "failed", "cancelled")


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)} - {"raw"}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class Model:
    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    status: str
    error: str | None = None
    created_at: datetime | None = None
    info: dict[str, Any] | None = None
    input_specs: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Model":
        return cls(**{**_known(cls, data), "created_at": _time(data.get("created_at"))}, raw=data)


@dataclass(frozen=True)
class Dataset:
    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    num_samples: int
    has_labels: bool
    created_at: datetime | None = None
    info: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Dataset":
        return cls(**{**_known(cls, data), "created_at": _time(data.get("created_at"))}, raw=data)


@dataclass(frozen=True)
class Artifact:
    id: str
    kind: str
    format: str
    filename: str
    size_bytes: int
    sha256: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Artifact":
        return cls(**_known(cls, data), raw=data)


@dataclass(frozen=True)
class JobError:
    code: str
    message: str


@dataclass(frozen=True)
class Progress:
    """Where a job stands: from a job's `progress` when polling, or from a live `progress` event (which adds
    `step_index`, `epoch` and `trial`). `status` is set when the update comes with the job's status."""

    fraction: float | None = None
    stage: str | None = None
    message: str | None = None
    step_index: int | None = None
    epoch: int | None = None
    trial: int | None = None
    status: str | None = None

    @classmethod
    def from_event(cls, data: dict[str, Any]) -> "Progress":
        return cls(fraction=data.get("fraction"), stage=data.get("stage"), message=data.get("message"),
                   step_index=data.get("step_index"), epoch=data.get("epoch"), trial=data.get("trial"))


@dataclass(frozen=True)
class Job:
    id: str
    model_id: str
    status: str
    name: str | None = None
    recipe: dict[str, Any] | None = None
    tune: dict[str, Any] | None = None
    datasets: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    error: JobError | None = None
    metrics: dict[str, Any] | None = None
    artifacts: list[Artifact] = field(default_factory=list)
    attempts: int = 0
    cancel_requested: bool = False
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Job":
        progress = data.get("progress") or {}
        error = data.get("error")
        return cls(**{**_known(cls, data),
                      "progress": Progress(fraction=progress.get("fraction"), stage=progress.get("step"),
                                           message=progress.get("message"), status=data.get("status")),
                      "error": JobError(str(error.get("code")), str(error.get("message"))) if error else None,
                      "artifacts": [Artifact.from_json(a) for a in data.get("artifacts") or []],
                      "datasets": data.get("datasets") or {}, "target": data.get("target") or {},
                      "created_at": _time(data.get("created_at")), "started_at": _time(data.get("started_at")),
                      "finished_at": _time(data.get("finished_at"))}, raw=data)
