"""HTTP: uploads that are not multipart, multipart that is malformed, bodies over the limit, and clients that
trickle or vanish mid-upload. Each gets a clear 4xx (or, for a vanished client, nothing at all): no 500, no
partial model visible in GET /v1/models, no temp file left under MODELPRESS_HOME/tmp, and a body over the limit
is answered 413 without being read to its end.

Size and connection attacks run against a real uvicorn server on a free port, spoken to over a raw socket, so
the test controls exactly what is sent and when."""

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from app.api.main import create_app
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

    def __init__(self, address: tuple[str, int], headers: dict[str, str]) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.sent = 0  # body bytes handed to the socket
        lines = ["POST /v1/models HTTP/1.1", "Host: modelpress", *(f"{k}: {v}" for k, v in headers.items())]
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
