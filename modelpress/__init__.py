"""The modelpress client: `Client` for Python, and the `modelpress` command (modelpress.cli).

It needs only the base install (httpx, rich): never the server's database layer, nor the worker's ML stack."""

from modelpress.client import Client
from modelpress.errors import ApiError
from modelpress.resources import Artifact, Dataset, Job, JobError, Model, Progress

__all__ = ["ApiError", "Artifact", "Client", "Dataset", "Job", "JobError", "Model", "Progress"]
