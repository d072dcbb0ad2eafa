"""The API explains itself: every operation, parameter and field of /openapi.json is described and has an example,
and /docs and /redoc work with no internet (their assets come from this service)."""

from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.core.config import Settings

CONTENT_TYPES = {".js": ("application/javascript", "text/javascript"), ".css": ("text/css",),
                 ".png": ("image/png",), ".json": ("application/json",)}


@pytest.fixture(scope="module")
def docs_client(tmp_path_factory):
    """The schema and the docs pages need no database: one app for the module."""
    settings = Settings(home=tmp_path_factory.mktemp("docs-home"))
    with TestClient(create_app(settings, housekeeping=False)) as client:
        yield client


def _field_problems(where: str, schema: dict) -> list[str]:
    """A schema's own description and example, and each property's description and example (a property may
    take its example from the schema's `examples`; a file part has none)."""
    problems = []
    properties = schema.get("properties", {})
    has_example = bool(schema.get("examples") or "example" in schema)
    if not schema.get("description"):
        problems.append(f"{where}: no description")
    if not properties and schema.get("type", "object") == "object" and "enum" not in schema \
            and not schema.get("additionalProperties"):
        return problems
    if "enum" in schema:
        return problems
    for name, prop in properties.items():
        if not prop.get("description"):
            problems.append(f"{where}.{name}: no description")
        if not (has_example or prop.get("examples") or "example" in prop or prop.get("format") == "binary"):
            problems.append(f"{where}.{name}: no example (on the field, or on the schema)")
    return problems


def undocumented(schema: dict) -> list[str]:
    """Everything in an OpenAPI schema that a reader of /docs would find unexplained."""
    problems = []
    tags = {tag["name"]: tag.get("description") for tag in schema.get("tags", [])}
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            if not operation.get("summary") or not operation.get("description"):
                problems.append(f"{where}: no summary or description")
            problems += [f"{where}: tag {tag!r} is not described" for tag in operation.get("tags", [])
                         if not tags.get(tag)]
            for parameter in operation.get("parameters", []):
                if not parameter.get("description"):
                    problems.append(f"{where}: parameter {parameter['name']!r} has no description")
                if not (parameter.get("example") is not None or parameter.get("examples")
                        or parameter["schema"].get("examples") or parameter["schema"].get("enum")
                        or "anyOf" in parameter["schema"] and any(s.get("enum") or s.get("$ref")
                                                                  for s in parameter["schema"]["anyOf"])):
                    problems.append(f"{where}: parameter {parameter['name']!r} has no example")
            for media, content in operation.get("requestBody", {}).get("content", {}).items():
                if "$ref" not in content.get("schema", {}):
                    problems += _field_problems(f"{where} {media} body", content["schema"])
    for name, component in schema["components"]["schemas"].items():
        problems += _field_problems(name, component)
    return problems


def test_every_operation_parameter_and_field_is_described_with_an_example(docs_client):
    schema = docs_client.get("/openapi.json").json()
    assert undocumented(schema) == []
    operation_ids = [operation["operationId"] for item in schema["paths"].values() for operation in item.values()]
    assert len(set(operation_ids)) == len(operation_ids) and "create_job" in operation_ids  # what clients call


def test_the_walk_finds_what_is_missing():
    bare = {"paths": {"/x": {"get": {"summary": "X", "tags": ["x"],
                                     "parameters": [{"name": "q", "schema": {"type": "string"}}]}}},
            "components": {"schemas": {"Thing": {"description": "a thing", "properties": {"a": {"type": "string"}}}}}}
    assert undocumented(bare) == ["GET /x: no summary or description", "GET /x: tag 'x' is not described",
                                  "GET /x: parameter 'q' has no description",
                                  "GET /x: parameter 'q' has no example", "Thing.a: no description",
                                  "Thing.a: no example (on the field, or on the schema)"]


class _Assets(HTMLParser):
    """Every URL a page loads: script src, link href, img src."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        url = attrs.get("src") if tag in ("script", "img") else attrs.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_everything_from_this_service(docs_client, page):
    response = docs_client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assets = _Assets()
    assets.feed(response.text)
    assert len(assets.urls) >= 2, assets.urls  # the script, and the icon (and Swagger UI's stylesheet)
    assert "/openapi.json" in response.text
    for url in assets.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"{page} loads {url} from elsewhere"
        asset = docs_client.get(url)
        assert asset.status_code == 200, url
        suffix = parts.path[parts.path.rfind("."):]
        assert asset.headers["content-type"].split(";")[0] in CONTENT_TYPES[suffix], (url, asset.headers)
        assert len(asset.content) > 1000


def test_the_favicon_is_there(docs_client):
    icon = docs_client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/png"
    assert icon.content.startswith(b"\x89PNG")
