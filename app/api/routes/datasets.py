"""/v1/datasets: streaming upload (validated before it is stored), list, get, delete."""


from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from app.api import services
from app.api.conditional import not_modified_or_charge, owned_or_charge, page_etag, version_etag
from app.api.deps import ConditionalTenant, CurrentTenant, SessionDep, SessionFactoryDep, SettingsDep, StorageDep
from app.api.errors import error_responses
from app.api.limits import receive_upload_within_quota
from app.api.pagination import page, paginate
from app.api.params import Cursor, DatasetId, Limit
from app.api.schemas import DatasetPublic, DatasetsPublic
from app.core.errors import ErrorCode, ServiceError
from app.core.queries import get_owned
from app.core.statuses import ACTIVE
from app.core.storage import keys as storage_keys
from app.core.tables import Dataset, Job
from app.core.vetting.dataset_files import inspect_dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def get_owned_dataset(session, tenant, dataset_id: str) -> Dataset:
    return get_owned(session, Dataset, dataset_id, tenant.id, "dataset")


@router.post("", status_code=201, response_model=DatasetPublic, responses=error_responses(400, 413, 415),
             openapi_extra={
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "description": "the dataset file, and an optional name",
        "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "`.npz` or `.safetensors` of named input arrays (optional `labels`), or `.jsonl` "
                                    "with `{\"text\": ..., \"label\": ...}` lines"},
            "name": {"type": "string", "description": "a name for the dataset (default: the file's name)",
                     "examples": ["calibration-256"]}}}}}}})
async def upload_dataset(request: Request, tenant: CurrentTenant, session_factory: SessionFactoryDep,
                         settings: SettingsDep, storage: StorageDep) -> Dataset:
    """Upload an `.npz`, `.safetensors` or `.jsonl` dataset; it is validated before anything is stored."""
    upload = await receive_upload_within_quota(request, session_factory, tenant.id, settings, {"name"})
    try:
        facts = await run_in_threadpool(inspect_dataset, upload.file.path, upload.file.filename)
        name = (upload.fields.get("name") or upload.file.filename)[:200]
        return await run_in_threadpool(services.add_dataset, session_factory, storage, settings, tenant.id,
                                       upload.file, name, facts)
    finally:
        upload.discard()


@router.get("", response_model=DatasetsPublic, responses={304: {"description": "not modified"},
                                                         **error_responses(400)})
def list_datasets(request: Request, response: Response, tenant: ConditionalTenant, session: SessionDep,
                  limit: Limit = 50, cursor: Cursor = None) -> dict | Response:
    """The tenant's datasets, newest first."""
    query = select(Dataset).where(Dataset.tenant_id == tenant.id)
    rows, next_cursor = page(session.scalars(paginate(query, Dataset.id, limit, cursor)).all(), limit)
    etag = page_etag(rows, next_cursor)
    if (not_modified := not_modified_or_charge(request, tenant.id, etag)) is not None:
        return not_modified
    response.headers["ETag"] = etag
    return {"data": rows, "next_cursor": next_cursor}


@router.get("/{dataset_id}", response_model=DatasetPublic,
            responses={304: {"description": "not modified"}, **error_responses(404)})
def get_dataset(dataset_id: DatasetId, request: Request, response: Response, tenant: ConditionalTenant,
                session: SessionDep) -> Dataset | Response:
    """A dataset: its format, samples, labels and arrays."""
    row = owned_or_charge(request, session, Dataset, dataset_id, tenant.id, "dataset")
    etag = version_etag(row.version)
    if (not_modified := not_modified_or_charge(request, tenant.id, etag)) is not None:
        return not_modified
    response.headers["ETag"] = etag
    return row


@router.delete("/{dataset_id}", status_code=204, response_class=Response,
               responses=error_responses(404, 409))
def delete_dataset(dataset_id: DatasetId, tenant: CurrentTenant, session: SessionDep,
                   storage: StorageDep) -> Response:
    """Delete a dataset and its file; 409 `dataset_in_use` while a queued or running job uses it."""
    dataset = get_owned_dataset(session, tenant, dataset_id)
    # Job.datasets is JSON ({"calibration": id, ...}); a tenant's unfinished jobs are few, so match them here
    # rather than with dialect-specific JSON operators.
    unfinished = session.execute(select(Job.id, Job.datasets).where(
        Job.tenant_id == tenant.id, Job.status.in_(ACTIVE))).all()
    for job_id, refs in unfinished:
        if dataset_id in (refs or {}).values():
            raise ServiceError(ErrorCode.DATASET_IN_USE,
                               f"dataset {dataset_id!r} is used by unfinished job {job_id!r}; "
                               "cancel it or wait for it to finish")
    session.delete(dataset)
    session.commit()
    storage.delete_prefix(storage_keys.dataset_prefix(tenant.id, dataset_id))
    return Response(status_code=204)
