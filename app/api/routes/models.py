"""/v1/models: streaming upload, list, get, download, delete."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from app.api import services
from app.api.conditional import not_modified_or_charge, owned_or_charge, page_etag, version_etag
from app.api.deps import (
    CeleryDep,
    ConditionalTenant,
    CurrentTenant,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
    StorageDep,
)
from app.api.downloads import stream_object
from app.api.errors import error_responses
from app.api.limits import receive_upload_within_quota
from app.api.pagination import page, paginate
from app.api.params import Cursor, Limit, ModelId
from app.api.schemas import ModelPublic, ModelsPublic
from app.core import input_specs
from app.core.errors import ErrorCode, ServiceError
from app.core.queries import get_owned
from app.core.statuses import ACTIVE
from app.core.storage import ObjectNotFound
from app.core.storage import keys as storage_keys
from app.core.tables import Job, Model
from app.core.vetting import detect, hf

router = APIRouter(prefix="/v1/models", tags=["models"])


def get_owned_model(session, tenant, model_id: str) -> Model:
    return get_owned(session, Model, model_id, tenant.id, "model")


@router.post("", status_code=201, response_model=ModelPublic, responses=error_responses(400, 413, 415), openapi_extra={
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "description": "the model file, and optional fields",
        "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "a `.pt2` (torch.export), `.onnx`, or a zip or tar.gz of a Hugging Face model "
                                    "directory (config.json and *.safetensors)"},
            "name": {"type": "string", "description": "a name for the model (default: the file's name)",
                     "examples": ["resnet18"]},
            "format": {"type": "string", "enum": list(detect.SUPPORTED_FORMATS),
                       "description": "the format you expect; detected from the content either way (415 "
                                      "`format_mismatch` if it disagrees)", "examples": ["onnx"]},
            "input_specs": {"type": "string", "description": "JSON: the default input specs of jobs on this model",
                            "examples": ['{"input": {"shape": [1, 3, 224, 224]}}']}}}}}}})
async def upload_model(request: Request, tenant: CurrentTenant, session_factory: SessionFactoryDep,
                       settings: SettingsDep, storage: StorageDep, celery: CeleryDep) -> Model:
    """Upload a `.pt2` (torch.export), `.onnx` or Hugging Face archive; a worker inspects it and sets it ready or
    invalid. An `input_specs` field (JSON) becomes the default input specs of its jobs."""
    upload = await receive_upload_within_quota(request, session_factory, tenant.id, settings,
                                               {"name", "format", "input_specs"})
    try:
        try:
            specs = input_specs.parse_json(upload.fields["input_specs"]) if upload.fields.get("input_specs") else None
        except ValueError as exc:
            raise ServiceError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        declared = upload.fields.get("format") or None
        unpacked_limit = hf.UNPACK_FACTOR * settings.max_upload_bytes
        fmt = await run_in_threadpool(detect.detect_format, upload.file.path, upload.file.filename,
                                      declared, max_unpacked_bytes=unpacked_limit)
        name = (upload.fields.get("name") or upload.file.filename)[:200]
        extension = await run_in_threadpool(detect.stored_extension, upload.file.path, fmt)
        return await run_in_threadpool(services.add_model, session_factory, storage, celery, settings, tenant.id,
                                       upload.file, name, fmt, extension, specs)
    finally:
        upload.discard()


@router.get("", response_model=ModelsPublic, responses={304: {"description": "not modified"},
                                                       **error_responses(400)})
def list_models(request: Request, response: Response, tenant: ConditionalTenant, session: SessionDep, limit: Limit = 50,
                cursor: Cursor = None,
                status: Annotated[str | None, Query(description="only models in this status: `uploaded`, `ready` "
                                                                "or `invalid`", examples=["ready"])] = None,
                ) -> dict | Response:
    """The tenant's models, newest first."""
    query = select(Model).where(Model.tenant_id == tenant.id)
    if status:
        query = query.where(Model.status == status)
    rows, next_cursor = page(session.scalars(paginate(query, Model.id, limit, cursor)).all(), limit)
    etag = page_etag(rows, next_cursor)
    if (not_modified := not_modified_or_charge(request, tenant.id, etag)) is not None:
        return not_modified
    response.headers["ETag"] = etag
    return {"data": rows, "next_cursor": next_cursor}


@router.get("/{model_id}", response_model=ModelPublic,
            responses={304: {"description": "not modified"}, **error_responses(404)})
def get_model(model_id: ModelId, request: Request, response: Response, tenant: ConditionalTenant,
              session: SessionDep) -> Model | Response:
    """A model: its status and, once inspected, what it takes and gives (`info`)."""
    row = owned_or_charge(request, session, Model, model_id, tenant.id, "model")
    etag = version_etag(row.version)
    if (not_modified := not_modified_or_charge(request, tenant.id, etag)) is not None:
        return not_modified
    response.headers["ETag"] = etag
    return row


@router.get("/{model_id}/download", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "partial"},
                       **error_responses(404, 416)})
def download_model(model_id: ModelId, request: Request, tenant: CurrentTenant, session: SessionDep,
                   storage: StorageDep) -> Response:
    """The uploaded file, as stored (ETag: its sha256; `Range` and `If-None-Match` are honoured)."""
    model = get_owned_model(session, tenant, model_id)
    extension = model.storage_key.rsplit("/", 1)[-1].partition(".")[2]  # pt2, onnx, zip, tar.gz or tar
    stem = model.name.removesuffix(f".{extension}") if model.name.endswith(f".{extension}") \
        else model.name.rsplit(".", 1)[0]
    filename = f"{stem}.{extension}"  # made safe for the header by stream_object
    try:
        return stream_object(request, storage, model.storage_key, size=model.size_bytes, sha256=model.sha256,
                             filename=filename)
    except ObjectNotFound:
        raise ServiceError(ErrorCode.NOT_FOUND, f"the file of model {model_id!r} is missing from storage") from None


@router.delete("/{model_id}", status_code=204, response_class=Response, responses=error_responses(404, 409))
def delete_model(model_id: ModelId, tenant: CurrentTenant, session: SessionDep, storage: StorageDep) -> Response:
    """Delete a model and its file; 409 `model_in_use` while a queued or running job uses it. Its jobs keep their
    history."""
    model = get_owned_model(session, tenant, model_id)
    active = session.scalar(select(Job.id).where(Job.model_id == model.id,
                                                 Job.status.in_(ACTIVE)).limit(1))
    if active:
        raise ServiceError(ErrorCode.MODEL_IN_USE, f"model {model_id!r} is used by unfinished job {active!r}; "
                                                   "cancel it or wait for it to finish")
    session.delete(model)
    session.commit()
    storage.delete_prefix(storage_keys.model_prefix(tenant.id, model_id))
    return Response(status_code=204)
