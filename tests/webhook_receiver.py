"""A real HTTP(S) server on 127.0.0.1 that receives webhooks in the tests, with endpoints that misbehave on purpose.

Paths (anything after the first segment is free, so each test can use its own):
  /ok...        200
  /slow...      200 after 0.5 s
  /flaky...     500 the first time for that path, then 200
  /fail...      500
  /redirect...  302 to /target (which records and answers 200, so a followed redirect would show)
  /trickle...   a 200 status line, then one header line every `trickle_interval` seconds, never the blank line
"""

import datetime
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Received:
    path: str
    headers: dict[str, str]  # names in lowercase
    body: bytes
    at: float  # time.monotonic() when the request was read


class Receiver:
    def __init__(self, trickle_interval: float = 0.5, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"):
        self.requests: list[Received] = []
        self.trickle_interval = trickle_interval
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                      body, time.monotonic()))
                    seen = receiver._seen[self.path] = receiver._seen.get(self.path, 0) + 1
                self.close_connection = True
                if self.path.startswith("/trickle"):
                    return self._trickle()
                if self.path.startswith("/slow"):
                    time.sleep(0.5)
                if self.path.startswith("/redirect"):
                    self._answer(302, {"Location": receiver.url("/target")})
                elif self.path.startswith("/fail") or (self.path.startswith("/flaky") and seen == 1):
                    self._answer(500)
                else:
                    self._answer(200)

            def _answer(self, status: int, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"ok")

            def _trickle(self) -> None:
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    self.wfile.flush()
                    for line in range(1000):
                        time.sleep(receiver.trickle_interval)
                        self.wfile.write(f"X-Trickle-{line}: still here\r\n".encode())
                        self.wfile.flush()
                except OSError:  # the sender gave up and closed the connection
                    pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def received(self, prefix: str = "/") -> list[Received]:
        """Requests to paths starting with `prefix` that carry a `webhook-id` (signed webhooks only)."""
        with self._lock:
            return [r for r in self.requests if r.path.startswith(prefix) and "webhook-id" in r.headers]

    def wait_for(self, prefix: str, count: int = 1, timeout: float = 10.0) -> list[Received]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(got := self.received(prefix)) >= count:
                return got
            time.sleep(0.02)
        return self.received(prefix)


def self_signed(folder: Path, name: str = "localhost") -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A certificate for `name` only: (the server's context, a client context that trusts just that certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    return server, ssl.create_default_context(cafile=str(cert_path))
