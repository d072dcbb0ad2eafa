"""The API process's memory under large JSON bodies: N concurrent clients each send a 100 MB JSON body to
POST /v1/jobs, without a key (and, with --with-key, with a valid one), and the API's resident memory is sampled
while they do.

Starts the real API (`modelpress migrate`, `modelpress keys create`, `modelpress api`, as bench/load_bench.py
does) over a temporary SQLite home, from the source tree given by --root (default: this checkout), so the same
script measures an older tree too (e.g. one exported with `git archive HEAD | tar -x -C /tmp/old`). Each client
writes its body in 1 MiB pieces over a raw socket and stops as soon as the server answers. Prints, per scenario:
RSS before, peak RSS while the bodies were sent (VmRSS sampled every 10 ms), VmHWM, and per client the status and
how many bytes it had sent when the answer came.

    .venv/bin/python bench/json_body_rss.py [--root PATH] [--clients 4] [--mb 100] [--with-key]
"""

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status(pid: int, field: str) -> float:
    """A /proc/<pid>/status figure in MiB (VmRSS: resident now, VmHWM: the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Api:
    def __init__(self, root: Path, work: Path):
        self.root, self.work = root, work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MODELPRESS_HOME": str(work / "home"), "PYTHONPATH": str(root),
                    "MODELPRESS_TENANT_REQUESTS_PER_MINUTE": "0"}
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "app.cli", *args], env=self.env, cwd=self.root, check=True,
                              capture_output=True, text=True).stdout

    def start(self) -> str:
        self.cli("migrate")
        key = self.cli("keys", "create", "--tenant", "bench").strip().splitlines()[-1]
        with open(self.work / "api.log", "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--port", str(self.port)],
                                         env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        for _ in range(240):
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return key
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        sys.exit(f"the API did not start: see {self.work / 'api.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def send_body(port: int, size: int, key: str | None, result: dict) -> None:
    """POST /v1/jobs with a `size`-byte JSON body ({"name": "xxx..."}), stopping when the server answers."""
    head = b'{"name": "'
    tail = b'"}'
    lines = ["POST /v1/jobs HTTP/1.1", "Host: bench", "Content-Type: application/json",
             f"Content-Length: {size}", *([f"Authorization: Bearer {key}"] if key else [])]
    started = time.monotonic()
    sent = 0
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        filler = b"x" * MiB
        while sent < size and not select.select([sock], [], [], 0)[0]:
            middle = filler[:min(MiB, size - sent - len(tail))]
            piece = head if sent == 0 else tail if size - sent == len(tail) else middle
            sock.sendall(piece)
            sent += len(piece)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        status = int(answer.split(b" ")[1]) if answer else None
    except (BrokenPipeError, ConnectionResetError):
        status = "reset"
    finally:
        sock.close()
    result.update(status=status, sent_mb=sent / 1e6, seconds=time.monotonic() - started)


def scenario(api: Api, clients: int, size: int, key: str | None) -> dict:
    pid = api.proc.pid
    httpx.get(f"{api.url}/v1/models", headers={"Authorization": "Bearer mp_warm_up"}, timeout=10)
    time.sleep(0.5)
    before = proc_status(pid, "VmRSS")
    peak, done = before, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc_status(pid, "VmRSS"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    results = [{} for _ in range(clients)]
    threads = [threading.Thread(target=send_body, args=(api.port, size, key, r)) for r in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(0.2)
    done.set()
    sampler.join()
    return {"rss_before_mb": round(before, 1), "rss_peak_mb": round(peak, 1),
            "vm_hwm_mb": round(proc_status(pid, "VmHWM"), 1), "clients": results}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=ROOT, help="the source tree whose API is started")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--mb", type=int, default=100, help="body size of each client, in MB (10^6 bytes)")
    parser.add_argument("--with-key", action="store_true", help="also send the bodies with a valid key")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelpress-json-rss-"))
    api = Api(args.root.resolve(), work)
    key = api.start()
    try:
        report = {"root": str(args.root.resolve()), "clients": args.clients, "body_mb": args.mb,
                  "no_key": scenario(api, args.clients, args.mb * 1_000_000, None)}
        if args.with_key:
            report["with_key"] = scenario(api, args.clients, args.mb * 1_000_000, key)
    finally:
        api.stop()
    for name in ("no_key", "with_key"):
        if name in report:
            row = report[name]
            print(f"{name:>8}: RSS before {row['rss_before_mb']} MiB, peak while sending {row['rss_peak_mb']} MiB, "
                  f"VmHWM {row['vm_hwm_mb']} MiB; answers: "
                  + ", ".join(f"{c['status']} after {c['sent_mb']:.1f} MB in {c['seconds']:.2f} s"
                              for c in row["clients"]))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
