"""Where the client finds the service and its key: arguments, then `MODELPRESS_URL` / `MODELPRESS_API_KEY`, then
the key `modelpress serve` saved in its home (`$MODELPRESS_HOME/api_key`, default `./.modelpress/api_key`).

The server's Settings (app.core.config) are not imported: the client installs and runs without the server's
dependencies, so the two defaults below are repeated here and kept equal to the server's."""

import os
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_HOME = Path("./.modelpress")


def resolve_url(url: str | None = None) -> str:
    return (url or os.environ.get("MODELPRESS_URL") or DEFAULT_URL).rstrip("/")


def key_file() -> Path:
    return Path(os.environ.get("MODELPRESS_HOME") or DEFAULT_HOME).expanduser() / "api_key"


def resolve_api_key(api_key: str | None = None) -> str | None:
    if api_key:
        return api_key
    if os.environ.get("MODELPRESS_API_KEY"):
        return os.environ["MODELPRESS_API_KEY"].strip()
    try:
        return key_file().read_text().strip() or None
    except OSError:
        return None
