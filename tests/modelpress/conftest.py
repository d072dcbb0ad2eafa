"""One real service for the client's tests (`modelpress serve`: the API and a worker, embedded defaults), started
once for the package, and a scripted HTTP server for what a real one will not do on cue (drops, 429s)."""

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import MODELPRESS, Processes, http_ok, wait_until
from tests.helpers import save_pt2

IN_FEATURES, OUT_FEATURES = 16, 4


@dataclass
class Service:
    url: str
    key: str
    processes: Processes

    def env(self) -> dict[str, str]:
        return {"MODELPRESS_URL": self.url, "MODELPRESS_API_KEY": self.key}


@pytest.fixture(scope="package")
def service(tmp_path_factory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("client-service")
    processes = Processes(root)
    home, port = root / "home", free_port()
    processes.start("serve", [*MODELPRESS, "serve", "--port", str(port)],
                    {"MODELPRESS_HOME": str(home), "MODELPRESS_LATENCY_RUNS": "5", "MODELPRESS_LATENCY_WARMUP": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/readyz"), 120, "serve to become ready", processes)
        yield Service(url, (home / "api_key").read_text().strip(), processes)
    finally:
        processes.stop_all()


@pytest.fixture(scope="package")
def model_file(tmp_path_factory) -> Path:
    return save_pt2(tmp_path_factory.mktemp("model") / "mlp.pt2", IN_FEATURES, 32, OUT_FEATURES, batch=8)


@pytest.fixture(scope="package")
def eval_file(tmp_path_factory) -> Path:
    """Labelled inputs for the model, so reports carry accuracy."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "eval.npz"
    np.savez(path, x=rng.standard_normal((32, IN_FEATURES)).astype(np.float32),
             labels=rng.integers(0, OUT_FEATURES, 32))
    return path


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    at: float


@dataclass
class ScriptedServer:
    """A real HTTP/1.1 server on a free port whose answers a test writes: `respond(handler, seen_so_far)`."""

    respond: Callable[[BaseHTTPRequestHandler, list[Seen]], None]
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        state = self.server.scripted  # type: ignore[attr-defined]
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        previous = list(state.seen)
        state.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                               time.monotonic()))
        state.respond(self, previous)

    do_GET = do_POST = _handle

    def log_message(self, *args) -> None:
        pass


def send_json(handler: BaseHTTPRequestHandler, status: int, body: object, headers: dict[str, str] | None = None
              ) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                        **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable], ScriptedServer]]:
    servers = []

    def start(respond: Callable) -> ScriptedServer:
        state = ScriptedServer(respond)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.scripted = state
        state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return state

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()
