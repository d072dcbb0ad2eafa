"""The dashboard's files at /ui: what is served and with which headers, and rules its code keeps (no inline code,
nothing from another origin, data never parsed as HTML). The dashboard itself runs in a browser in
tests/e2e/test_dashboard.py."""

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.api.routes.ui import UI_DIR
from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = sorted(UI_DIR.glob("*.js"))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(create_app(Settings(home=tmp_path_factory.mktemp("ui")), housekeeping=False)) as test_client:
        yield test_client


@pytest.mark.parametrize("path, media_type", [("/ui", "text/html"), ("/ui/app.js", "text/javascript"),
                                              ("/ui/style.css", "text/css"), ("/ui/favicon.svg", "image/svg+xml")])
def test_each_file_is_served_with_its_type_and_a_strict_policy(client, path, media_type):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self';" in policy and "unsafe" not in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    again = client.get(path, headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_the_slash_form_redirects_and_unknown_names_are_404(client):
    response = client.get("/ui/", follow_redirects=False)
    assert response.status_code == 308 and response.headers["location"] == "/ui"
    for name in ("missing.js", "..%2F..%2Fapi%2Fmain.py", "routes", "index.html.bak"):
        response = client.get(f"/ui/{name}")
        assert response.status_code == 404, name
        assert response.json()["error"]["code"] == "not_found"


def test_browsers_asking_for_favicon_ico_get_an_icon(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response.headers["content-type"].startswith("image/")


def test_the_dashboard_is_not_part_of_the_api_schema(client):
    assert not [path for path in client.get("/openapi.json").json()["paths"] if path.startswith("/ui")]


def test_the_page_has_no_inline_code_and_loads_only_its_own_files():
    page = (UI_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "inline script"
    assert not re.search(r"\son[a-z]+=", page) and "style=" not in page and "<style" not in page
    for url in re.findall(r'(?:src|href)="([^"#]+)"', page):
        assert url.startswith("/ui/") and (UI_DIR / url.removeprefix("/ui/")).is_file(), url


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_never_parse_data_as_html_nor_call_another_origin(script):
    code = script.read_text()
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                      "localStorage", "?key=", "&key="):
        assert forbidden not in code, f"{script.name} uses {forbidden}"
    assert not [u for u in re.findall(r"https?://[^\s\"'`]+", code) if u != "http://www.w3.org/2000/svg"]
    for imported in re.findall(r'from "\./([^"]+)"', code):
        assert (UI_DIR / imported).is_file(), f"{script.name} imports a missing {imported}"


def test_the_package_ships_every_dashboard_file():
    """A non-editable install must carry app/ui: each file matches the package-data patterns of `app`."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app"]
    files = [path.relative_to(UI_DIR.parent).as_posix() for path in UI_DIR.iterdir() if path.is_file()]
    assert files and all(any(fnmatch(name, pattern) for pattern in patterns) for name in files), files
