"""Where things live in the artifact store: every key is built and parsed here.

    tenants/<tenant>/models/<model id>/model.<ext>
    tenants/<tenant>/datasets/<dataset id>/data.<format>
    tenants/<tenant>/jobs/<job id>/<filename>       (fixed per job: a re-run overwrites, never duplicates)

Everything of one resource sits under its own prefix, so deleting it is one `delete_prefix`.
"""

from typing import NamedTuple

OWNER_KINDS = ("models", "datasets", "jobs")


def model_prefix(tenant_id: str, model_id: str) -> str:
    return f"tenants/{tenant_id}/models/{model_id}/"


def model_key(tenant_id: str, model_id: str, extension: str) -> str:
    return f"{model_prefix(tenant_id, model_id)}model.{extension}"


def dataset_prefix(tenant_id: str, dataset_id: str) -> str:
    return f"tenants/{tenant_id}/datasets/{dataset_id}/"


def dataset_key(tenant_id: str, dataset_id: str, fmt: str) -> str:
    return f"{dataset_prefix(tenant_id, dataset_id)}data.{fmt}"


def job_prefix(tenant_id: str, job_id: str) -> str:
    return f"tenants/{tenant_id}/jobs/{job_id}/"


def job_key(tenant_id: str, job_id: str, filename: str) -> str:
    return f"{job_prefix(tenant_id, job_id)}{filename}"


class Owner(NamedTuple):
    kind: str  # models, datasets or jobs
    id: str


def owner_of(key: str) -> Owner | None:
    """The model, dataset or job a key belongs to; None for a key of any other shape."""
    parts = key.split("/")
    if len(parts) >= 5 and parts[0] == "tenants" and parts[2] in OWNER_KINDS:
        return Owner(parts[2], parts[3])
    return None
