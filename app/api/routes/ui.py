"""/ui: the web dashboard, static files shipped inside the package (app/ui). The page holds no data and no
secret: its scripts sign in with an API key and call the public /v1 API like any other client.

Only the files found in app/ui at start-up are served (no path from the request reaches the file system), each
with a strict Content-Security-Policy: scripts and styles from this origin only, no inline code, no framing."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from app.api.conditional import etag_matches
from app.core.errors import ErrorCode, ServiceError

UI_DIR = Path(__file__).resolve().parents[2] / "ui"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Everything the dashboard loads comes from this origin; `connect-src 'self'` keeps its API calls here too.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}

router = APIRouter(tags=["ui"], include_in_schema=False)


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets(folder: Path = UI_DIR) -> dict[str, Asset]:
    """The dashboard's files by name, read once: they are small and fixed for the life of the process."""
    assets = {}
    for path in sorted(folder.iterdir()):
        media_type = MEDIA_TYPES.get(path.suffix)
        if media_type and path.is_file():
            body = path.read_bytes()
            assets[path.name] = Asset(body, media_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    return assets


ASSETS = load_assets()


def serve(request: Request, name: str) -> Response:
    asset = ASSETS.get(name)
    if asset is None:
        raise ServiceError(ErrorCode.NOT_FOUND, f"the dashboard has no file {name[:100]!r}")
    # no-cache: the browser revalidates (a 304 when unchanged), so a new version is seen at once after an upgrade.
    headers = {**SECURITY_HEADERS, "ETag": asset.etag, "Cache-Control": "no-cache"}
    if etag_matches(request, asset.etag):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/ui")
def index(request: Request) -> Response:
    return serve(request, "index.html")


@router.get("/ui/")
def index_slash() -> Response:
    return RedirectResponse("/ui", status_code=308)


@router.get("/ui/{name}")
def asset(name: str, request: Request) -> Response:
    return serve(request, name)
