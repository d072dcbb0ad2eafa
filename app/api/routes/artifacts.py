"""/v1/artifacts/{id}/download: the bytes of a job's output (model, JSON or HTML report, model card), with ETag (its
sha256) and Range."""

from fastapi import APIRouter, Request, Response

from app.api.deps import CurrentTenant, SessionDep, StorageDep
from app.api.downloads import stream_object
from app.api.errors import error_responses
from app.api.params import ArtifactId
from app.core.errors import ErrorCode, ServiceError
from app.core.queries import get_owned
from app.core.storage import ObjectNotFound
from app.core.tables import Artifact

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])

MEDIA_TYPES = {"json": "application/json", "md": "text/markdown; charset=utf-8", "html": "text/html; charset=utf-8"}
# Downloads are attachments; should a browser render one anyway (an HTML report opened from a link), it may not
# guess another type, run a script or load anything: the report needs only its inline styles and SVG.
DOWNLOAD_HEADERS = {"X-Content-Type-Options": "nosniff",
                    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                               "sandbox"}


@router.get("/{artifact_id}/download", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "partial"},
                       **error_responses(404, 416)})
def download_artifact(artifact_id: ArtifactId, request: Request, tenant: CurrentTenant, session: SessionDep,
                      storage: StorageDep) -> Response:
    """An artifact's bytes with `Content-Disposition`, `ETag` (its sha256), `Range` (206) and `If-None-Match`
    (304)."""
    artifact = get_owned(session, Artifact, artifact_id, tenant.id, "artifact")
    if artifact.job.deleted_at is not None:
        raise ServiceError(ErrorCode.NOT_FOUND, f"artifact {artifact_id!r} was deleted with the outputs of job "
                                                f"{artifact.job_id!r} at {artifact.job.deleted_at:%Y-%m-%dT%H:%M:%SZ}")
    try:
        response = stream_object(request, storage, artifact.storage_key, size=artifact.size_bytes,
                                 sha256=artifact.sha256, filename=artifact.filename,
                                 media_type=MEDIA_TYPES.get(artifact.format, "application/octet-stream"))
    except ObjectNotFound:
        raise ServiceError(ErrorCode.NOT_FOUND,
                           f"the file of artifact {artifact_id!r} is missing from storage") from None
    response.headers.update(DOWNLOAD_HEADERS)
    return response
