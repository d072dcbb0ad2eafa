"""HTTP: uploads that are not multipart, multipart that is malformed, bodies over the limit, and clients that
trickle or vanish mid-upload. Each gets a clear 4xx (or, for a vanished client, nothing at all): no 500, no
partial model visible in GET /v1/models, no temp file left under MODELPRESS_HOME/tmp, and a body over the limit
is answered 413 without being read to its end.

Size and connection attacks run against a real uvicorn server on a free port, spoken to over a raw socket, so
the test controls exactly what is sent and when."""

import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
import uvicorn
from sqlalchemy import update

from app.api.main import create_app
from app.core.db import make_engine, make_session_factory, session_scope
from app.core.tables import Model
from tests.conftest import free_port

BOUNDARY = "hostileboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
MiB = 1024 * 1024


def file_part(filename: str = "model.onnx") -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def closing() -> bytes:
    return f"\r\n--{BOUNDARY}--\r\n".encode()


def temp_uploads(settings) -> list[Path]:
    return sorted(settings.upload_tmp_dir().glob("upload-*"))


# --- in-process API: content types and malformed multipart ---------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain", "application/octet-stream",
                                          "application/x-www-form-urlencoded", "multipart/form-data",
                                          f"multipart/mixed; boundary={BOUNDARY}"],
                         ids=["missing", "json", "text", "octet_stream", "urlencoded", "no_boundary", "mixed"])
def test_upload_that_is_not_multipart_form_data_is_415(client, auth, settings, onnx_bytes: bytes,
                                                       content_type: str | None) -> None:
    headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
    response = client.post("/v1/models", headers=headers, content=onnx_bytes)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert "multipart/form-data" in response.json()["error"]["message"]
    assert temp_uploads(settings) == []


MALFORMED = {
    "other_boundary": (file_part().replace(BOUNDARY.encode(), b"somethingelse") + b"data" + closing(), 400,
                       "malformed multipart body: Expected boundary character"),
    "no_closing_boundary": (file_part() + b"data", 400, "the file part never ended"),
    "cut_in_headers": (file_part()[:40], 422, "file: field required"),
    "header_without_colon": (f"--{BOUNDARY}\r\nnot a header\r\n\r\ndata".encode() + closing(), 400,
                             "malformed multipart body: Found invalid character"),
    "part_without_name": (f'--{BOUNDARY}\r\nContent-Disposition: form-data; filename="m.onnx"\r\n\r\n'.encode()
                          + b"data" + closing(), 422, "(unnamed): unknown form field"),
    "part_without_disposition": (f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\n".encode() + b"data" + closing(),
                                 422, "(unnamed): unknown form field"),
    "file_without_filename": (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"\r\n\r\n'.encode()
                              + b"data" + closing(), 422, "the part must be a file with a filename"),
    "two_files": (file_part() + b"one\r\n" + file_part() + b"two" + closing(), 400,
                  "only one 'file' part is allowed"),
    "no_parts": (f"--{BOUNDARY}--\r\n".encode(), 422, "file: field required"),
    "empty_body": (b"", 422, "file: field required"),
    "long_text_field": (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\n'.encode()
                        + b"n" * 2000 + b"\r\n" + file_part() + b"data" + closing(), 422, "name: value longer than"),
    "huge_part_header": (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="'.encode()
                         + b"x" * (2 * MiB) + b'"\r\n\r\ndata' + closing(), 400, "Maximum header size exceeded"),
    "too_many_part_headers": (file_part()[:-2] + b"X-A: 1\r\n" * 100 + b"\r\ndata" + closing(), 400,
                              "Maximum header count exceeded"),
}


@pytest.mark.parametrize("attack", MALFORMED)
def test_malformed_multipart_is_a_clear_4xx(client, auth, settings, attack: str) -> None:
    body, status, reason = MALFORMED[attack]
    response = client.post("/v1/models", headers={**auth, "Content-Type": MULTIPART}, content=body)
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]["message"]
    assert client.get("/v1/models", headers=auth).json()["data"] == []
    assert temp_uploads(settings) == []


# --- a real server: sizes, slow and vanishing clients ------------------------------------------------------------


@pytest.fixture
def server(settings) -> Iterator[tuple[str, int]]:
    """This test's API served by uvicorn on a free port, in a thread of this process."""
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(create_app(settings, housekeeping=False), host="127.0.0.1", port=port,
                                             log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield "127.0.0.1", port
    instance.should_exit = True
    thread.join(10)


class RawUpload:
    """POST /v1/models written by hand to a socket: the test decides what is sent, when, and whether it ends."""

    def __init__(self, address: tuple[str, int], headers: dict[str, str], path: str = "/v1/models") -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.sent = 0  # body bytes handed to the socket
        lines = [f"POST {path} HTTP/1.1", "Host: modelpress", *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def answered(self) -> bool:
        """Whether the server has already said something (without waiting)."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def response(self) -> tuple[int, dict]:
        """Status and JSON body; the server may close the connection right after, unread body and all."""
        data = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                break
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), json.loads(body)

    def close(self) -> None:
        self.sock.close()


def api_get(address: tuple[str, int], path: str, auth: dict[str, str]) -> httpx.Response:
    return httpx.get(f"http://{address[0]}:{address[1]}{path}", headers=auth, timeout=5)


def wait_until(predicate, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def test_declared_oversize_body_is_413_before_it_is_read(server, auth, settings) -> None:
    """1 GiB declared, 1 MiB sent, then the client waits: only a server that does not need the rest answers."""
    upload = RawUpload(server, {**auth, "Content-Type": MULTIPART, "Content-Length": str(1024 * MiB)})
    upload.send(file_part() + bytes(MiB))
    status, body = upload.response()
    upload.close()
    assert status == 413 and body["error"]["code"] == "too_large"
    assert upload.sent < 2 * MiB
    assert temp_uploads(settings) == []


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


# What follows the opening of a streamed body, repeated without end: a file that keeps growing, small text parts
# (each under the field limit), or junk after the closing boundary, which multipart parsers skip.
ENDLESS = {
    "growing_file": (file_part(), bytes(64 * 1024)),
    "many_small_parts": (b"", (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\n'
                               f'{"n" * 100}\r\n').encode() * 400),
    "junk_after_the_end": (file_part() + b"\x08\x07" + closing(), bytes(64 * 1024)),
}


@pytest.mark.parametrize("attack", ENDLESS)
def test_streamed_oversize_body_is_413_once_past_the_limit(server, auth, settings, attack: str) -> None:
    """No length declared (chunked): the server stops reading soon after the limit, not at the client's 1 GiB."""
    opening, repeated = ENDLESS[attack]
    upload = RawUpload(server, {**auth, "Content-Type": MULTIPART, "Transfer-Encoding": "chunked"})
    if opening:
        upload.send(chunked(opening))
    try:
        while upload.sent < 1024 * MiB and not upload.answered():
            upload.send(chunked(repeated))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while we were still writing
    status, body = upload.response()
    upload.close()
    assert status == 413 and body["error"]["code"] == "too_large"
    assert upload.sent < settings.max_upload_bytes + 32 * MiB  # the limit plus what socket buffers hold
    wait_until(lambda: temp_uploads(settings) == [], "the partial upload is removed")


def test_aborted_upload_leaves_no_model_and_no_temp_file(server, auth, settings) -> None:
    upload = RawUpload(server, {**auth, "Content-Type": MULTIPART, "Content-Length": str(3 * MiB)})
    upload.send(file_part() + bytes(MiB))
    wait_until(lambda: temp_uploads(settings) != [], "the server writes the partial upload")
    upload.close()  # the client vanishes mid-body
    wait_until(lambda: temp_uploads(settings) == [], "the partial upload is removed")
    assert api_get(server, "/v1/models", auth).json()["data"] == []


def test_slow_upload_neither_blocks_others_nor_shows_early(server, auth, settings, onnx_bytes: bytes) -> None:
    body = file_part("slow.onnx") + onnx_bytes + closing()
    upload = RawUpload(server, {**auth, "Content-Type": MULTIPART, "Content-Length": str(len(body))})
    pieces = [body[i:i + len(body) // 8 + 1] for i in range(0, len(body), len(body) // 8 + 1)]
    for index, piece in enumerate(pieces):
        upload.send(piece)
        time.sleep(0.1)
        if index == len(pieces) // 2:
            started = time.monotonic()
            assert api_get(server, "/healthz", {}).status_code == 200
            assert time.monotonic() - started < 1
            assert api_get(server, "/v1/models", auth).json()["data"] == []
    status, created = upload.response()
    upload.close()
    assert status == 201 and created["name"] == "slow.onnx"
    assert [m["id"] for m in api_get(server, "/v1/models", auth).json()["data"]] == [created["id"]]
    assert temp_uploads(settings) == []


# --- JSON bodies: the key before the body, a cap on its size ----------------------------------------------------


JSON = "application/json"


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/keys", "/v1/keys/key_x/rotate"])
@pytest.mark.parametrize("key", [None, "Bearer mp_0123456789ab_not-a-real-key", "Basic dXNlcjpwYXNz"],
                         ids=["no_key", "invalid_key", "other_scheme"])
def test_json_body_without_a_valid_key_is_401_before_it_is_read(server, settings, path: str,
                                                                key: str | None) -> None:
    """100 MiB declared, 1 MiB sent, then the client waits: the 401 must come without the rest (FastAPI reads a
    route's JSON body before its dependencies, so the key dependency alone answered only after the whole body)."""
    headers = {"Content-Type": JSON, "Content-Length": str(100 * MiB), **({"Authorization": key} if key else {})}
    upload = RawUpload(server, headers, path)
    upload.send(b'{"name": "' + b"x" * MiB)
    status, body = upload.response()
    upload.close()
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert upload.sent < 2 * MiB


def test_declared_oversize_json_body_is_413_before_it_is_read(server, auth, settings) -> None:
    upload = RawUpload(server, {**auth, "Content-Type": JSON, "Content-Length": str(100 * MiB)}, "/v1/jobs")
    upload.send(b'{"model_id": "' + b"x" * MiB)
    status, body = upload.response()
    upload.close()
    assert status == 413 and body["error"]["code"] == "too_large"
    assert "MODELPRESS_MAX_JSON_BYTES" in body["error"]["message"]
    assert upload.sent < 2 * MiB


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/keys"])
def test_streamed_json_body_is_413_once_past_the_cap(server, auth, settings, path: str) -> None:
    """No length declared (chunked): the server stops at the cap, not at the client's 1 GiB."""
    upload = RawUpload(server, {**auth, "Content-Type": JSON, "Transfer-Encoding": "chunked"}, path)
    upload.send(chunked(b'{"exclude": ["'))
    try:
        while upload.sent < 1024 * MiB and not upload.answered():
            upload.send(chunked(b"a" * 64 * 1024))
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, body = upload.response()
    upload.close()
    assert status == 413 and body["error"]["code"] == "too_large"
    assert upload.sent < settings.max_json_bytes + 32 * MiB  # the cap plus what socket buffers hold


def test_json_body_past_the_cap_is_413_in_process(client, auth, settings) -> None:
    """A recipe stuffed with 150 MB of `exclude` was stored and listed back; now no JSON body passes the cap."""
    body = json.dumps({"model_id": "mdl_x", "recipe": {"steps": [
        {"op": "quantize", "exclude": ["a" * 500] * 100}] * 32}}).encode()
    assert len(body) > settings.max_json_bytes
    response = client.post("/v1/jobs", headers={**auth, "Content-Type": JSON}, content=body)
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"


# --- NUL bytes and numbers JSON does not have -------------------------------------------------------------------


def id_routes(client) -> list[tuple[str, str]]:
    """Every (method, path) of the schema that takes an id in its path."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(method, path) for path, operations in paths.items() if "{" in path for method in operations]


def test_nul_in_an_id_is_404_on_every_route(client, auth) -> None:
    """PostgreSQL text cannot hold NUL: `/v1/models/%00` was a 500 there. No id has one, so it is not found."""
    routes = id_routes(client)
    assert len(routes) >= 10
    for method, template in routes:
        path = re.sub(r"{\w+}", "mdl_%00x", template)
        response = client.request(method.upper(), path, headers=auth)
        assert response.status_code == 404, (method, template, response.text)
        assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("path, parameter", [("/v1/models?status=ready%00", "status"),
                                             ("/v1/jobs?model_id=mdl_%00", "model_id"),
                                             ("/v1/jobs?cursor=%00", "cursor"),
                                             ("/v1/datasets?cursor=abc%00", "cursor"),
                                             ("/v1/keys?limit=5&cursor=%00", "cursor"),
                                             ("/v1/presets?anything=%00", "anything")])
def test_nul_in_a_query_parameter_is_422_naming_it(client, auth, path: str, parameter: str) -> None:
    response = client.get(path, headers=auth)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith(f"{parameter}: must not contain NUL")


NUL_FIELDS = {
    "name": ({"name": "a\x00b"}, "name"),
    "model_id": ({"model_id": "mdl_\x00"}, "model_id"),
    "preset": ({"recipe": None, "preset": "int8\x00"}, "preset"),
    "dataset": ({"datasets": {"eval": "ds_\x00"}}, "datasets.eval"),
    "exclude": ({"recipe": {"steps": [{"op": "quantize", "exclude": ["ok", "fc\x00"]}]}},
                "recipe.steps.0.quantize.exclude.1"),
    "student": ({"recipe": {"steps": [{"op": "distill", "student": {"model_id": "mdl_\x00"}}]},
                 "datasets": {"train": "ds_x"}}, "recipe.steps.0.distill.student.model_id"),
    "newline_in_name": ({"name": "line\r\nbreak"}, "name"),
}


@pytest.mark.parametrize("field", NUL_FIELDS)
def test_control_character_in_a_json_string_is_422_naming_the_field(client, auth, upload, field: str) -> None:
    extra, where = NUL_FIELDS[field]
    body = {"model_id": upload().json()["id"], "recipe": {"steps": [{"op": "quantize"}]}, **extra}
    response = client.post("/v1/jobs", headers=auth, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith(f"{where}: must not contain control characters")
    assert client.get("/v1/jobs", headers=auth).json()["data"] == []


def test_control_character_in_a_key_name_is_422(client, auth) -> None:
    response = client.post("/v1/keys", headers=auth, json={"name": "ci\x00"})
    assert response.status_code == 422 and response.json()["error"]["message"].startswith("name: ")


@pytest.mark.parametrize("route", ["/v1/models", "/v1/datasets"])
@pytest.mark.parametrize("attack", ["nul_in_name", "newline_in_name", "nul_in_filename", "escape_in_filename"])
def test_control_character_in_an_upload_name_is_422(client, auth, settings, onnx_bytes: bytes, route: str,
                                                    attack: str) -> None:
    """Upload names become download file names and listings: NUL broke PostgreSQL, CR/LF the download's headers.
    They are refused (422, naming the field), not silently rewritten."""
    # (CR/LF cannot reach a filename: they end the part's header line, which is then malformed multipart: 400.)
    bad = {"nul": "a\x00b", "newline": "a\r\nb", "escape": "a\x1b[31mb"}[attack.split("_")[0]]
    if attack.endswith("filename"):
        body, field = file_part(f"{bad}.onnx") + onnx_bytes + closing(), "file: the filename"
    else:
        body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{bad}\r\n'.encode()
                + file_part() + onnx_bytes + closing())
        field = "name:"
    response = client.post(route, headers={**auth, "Content-Type": MULTIPART}, content=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith(f"{field} must not contain control characters")
    assert client.get(route, headers=auth).json()["data"] == []
    assert temp_uploads(settings) == []


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
def test_non_finite_json_numbers_are_400(client, auth, upload, literal: bytes) -> None:
    """`{"threshold": Infinity}` passed validation and was a 500 on PostgreSQL (SQLite stored non-standard JSON)."""
    model_id = upload().json()["id"].encode()
    body = b'{"model_id": "' + model_id + b'", "recipe": {"steps": [{"op": "prune", "threshold": ' + literal + b"}]}}"
    response = client.post("/v1/jobs", headers={**auth, "Content-Type": JSON}, content=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_request"
    assert response.json()["error"]["message"].startswith("malformed JSON body: ")
    assert client.get("/v1/jobs", headers=auth).json()["data"] == []


@pytest.mark.parametrize("value", ["Infinity", "inf", "NaN", "-inf"])
def test_non_finite_numbers_given_as_strings_are_422(client, auth, upload, value: str) -> None:
    body = {"model_id": upload().json()["id"], "recipe": {"steps": [{"op": "prune", "threshold": value}]}}
    response = client.post("/v1/jobs", headers=auth, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("recipe.steps.0.prune.threshold: ")


# --- download names: not Latin-1, control characters, quotes ---------------------------------------------------


# RFC 6266: a quoted-string filename (printable ASCII, no quote or backslash), and filename* in RFC 8187's
# ext-value form (UTF-8, attr-chars and %XX only).
DISPOSITION = re.compile(r'attachment; filename="([\x20-\x7e]*)"; '
                         r"filename\*=UTF-8''((?:[A-Za-z0-9!#$&+\-.^_`|~]|%[0-9A-F]{2})+)")


def disposition_names(header: str) -> tuple[str, str]:
    """(filename, decoded filename*) of a header that has exactly the form above."""
    match = DISPOSITION.fullmatch(header)
    assert match, header
    assert '"' not in match.group(1) and "\\" not in match.group(1)
    return match.group(1), unquote(match.group(2), errors="strict")


DOWNLOAD_NAMES = {
    "cyrillic": ("модель.onnx", "модель.onnx", "download.onnx"),
    "accents_and_quotes": ('café "v2"\\x.onnx', 'café "v2"\\x.onnx', "cafe v2x.onnx"),
    "header_injection": ("evil\r\nSet-Cookie: a=b\r\n.onnx", "evilSet-Cookie: a=b.onnx", "evilSet-Cookie: a=b.onnx"),
}


@pytest.mark.parametrize("case", DOWNLOAD_NAMES)
def test_download_names_make_valid_headers(server, auth, settings, onnx_bytes: bytes, case: str) -> None:
    """A name outside Latin-1 made downloads 500 (the header could not be encoded); CR/LF dropped the connection.
    Rows from before names were checked at upload may still hold them, and artifacts are named by workers: the
    download writes RFC 6266 `filename` (ASCII) + `filename*` (UTF-8) whatever the name."""
    stored, exact, fallback = DOWNLOAD_NAMES[case]
    base = f"http://{server[0]}:{server[1]}"
    created = httpx.post(f"{base}/v1/models", headers=auth, files={"file": ("m.onnx", onnx_bytes)}, timeout=10)
    model = created.json()
    engine = make_engine(settings.resolved_database_url())
    with session_scope(make_session_factory(engine)) as session:
        session.execute(update(Model).where(Model.id == model["id"]).values(name=stored))
    engine.dispose()
    response = httpx.get(f"{base}/v1/models/{model['id']}/download", headers=auth, timeout=10)
    assert response.status_code == 200 and response.content == onnx_bytes
    header = response.headers["content-disposition"]
    assert header.isascii() and "\r" not in header and "\n" not in header and "set-cookie" not in response.headers
    assert disposition_names(header) == (fallback, exact)


def test_non_latin1_upload_name_downloads(client, auth, onnx_bytes: bytes) -> None:
    model = client.post("/v1/models", headers=auth, files={"file": ("m.onnx", onnx_bytes)},
                        data={"name": "модель.onnx"}).json()
    assert model["name"] == "модель.onnx"
    response = client.get(f"/v1/models/{model['id']}/download", headers=auth)
    assert response.status_code == 200 and response.content == onnx_bytes
    assert disposition_names(response.headers["content-disposition"]) == ("download.onnx", "модель.onnx")
