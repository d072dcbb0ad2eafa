"""Polling cost on `modelpress serve` as the README starts it, measured with wrk (a real load generator).

For each API process count given, starts `modelpress serve --workers N` in a temporary home (rate limit off: this
measures what the server takes, not the limit), uploads a small ONNX model, runs one job to `succeeded` (a real
body: metrics, artifacts) and submits 19 more that are cancelled (a full list page), then runs wrk against, in
turn and repeated over rounds so that machine noise hits every path alike:

  /healthz (no database, no key) | GET /v1/jobs/{id} | the same with If-None-Match (304) |
  GET /v1/jobs?limit=20 | the same with If-None-Match (304)

and prints requests per second (median of the rounds), p50 latency and the ratio to /healthz.

    .venv/bin/python bench/poll_bench.py [--workers 1,default] [--rounds 5] [--seconds 5] [--threads 2]
        [--connections 16]
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import save_onnx  # noqa: E402

MODELPRESS = Path(sys.executable).with_name("modelpress")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(what)


class Service:
    def __init__(self, work: Path, workers: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MODELPRESS_HOME": str(work / "home"), "MODELPRESS_TENANT_REQUESTS_PER_MINUTE": "0",
               "MODELPRESS_LATENCY_RUNS": "5"}
        command = [str(MODELPRESS), "serve", "--port", str(self.port)]
        if workers != "default":
            command += ["--workers", workers]
        self.log = open(work / "serve.log", "w")
        self.process = subprocess.Popen(command, env=env, cwd=work, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_until(lambda: httpx.get(f"{self.url}/healthz").status_code == 200, 120, "the service to start")
        self.key = (work / "home" / "api_key").read_text().strip()
        self.api_processes = len(re.findall(r"Started server process", (work / "serve.log").read_text()))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


def prepare(service: Service, work: Path) -> tuple[str, str, str]:
    """A finished job, 19 cancelled ones; returns (job id, job ETag, list ETag)."""
    headers = {"Authorization": f"Bearer {service.key}"}
    client = httpx.Client(base_url=service.url, headers=headers, timeout=60)
    model_path = save_onnx(work / "mlp.onnx")
    model = client.post("/v1/models", files={"file": ("mlp.onnx", model_path.read_bytes())}).json()
    wait_until(lambda: client.get(f"/v1/models/{model['id']}").json()["status"] == "ready", 120, "inspection")
    recipe = {"steps": [{"op": "quantize"}]}
    job = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": recipe}).json()
    wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", 300, "the job")
    for _ in range(19):
        queued = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": recipe}).json()
        client.post(f"/v1/jobs/{queued['id']}/cancel")
    wait_until(lambda: all(j["status"] in ("succeeded", "cancelled")
                           for j in client.get("/v1/jobs?limit=20").json()["data"]), 300, "the cancellations")
    return (job["id"], client.get(f"/v1/jobs/{job['id']}").headers["etag"],
            client.get("/v1/jobs?limit=20").headers["etag"])


def wrk(url: str, headers: dict[str, str], seconds: int, threads: int, connections: int) -> dict:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p50.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": float(p50.group(1)) * scale, "errors": int(errors.group(1)) if errors else 0}


def measure(workers: str, args) -> list[tuple]:
    work = Path(tempfile.mkdtemp(prefix="poll-bench-"))
    service = Service(work, workers)
    try:
        job_id, job_etag, list_etag = prepare(service, work)
        auth = {"Authorization": f"Bearer {service.key}"}
        paths = [("/healthz", service.url + "/healthz", {}),
                 ("GET /v1/jobs/{id}", f"{service.url}/v1/jobs/{job_id}", auth),
                 ("GET /v1/jobs/{id} -> 304", f"{service.url}/v1/jobs/{job_id}", {**auth, "If-None-Match": job_etag}),
                 ("GET /v1/jobs?limit=20", f"{service.url}/v1/jobs?limit=20", auth),
                 ("GET /v1/jobs?limit=20 -> 304", f"{service.url}/v1/jobs?limit=20",
                  {**auth, "If-None-Match": list_etag})]
        results: dict[str, list[dict]] = {name: [] for name, _, _ in paths}
        for _ in range(args.rounds):
            for name, url, headers in paths:
                results[name].append(wrk(url, headers, args.seconds, args.threads, args.connections))
        base = statistics.median(r["rps"] for r in results["/healthz"])
        rows = []
        for name, _, _ in paths:
            rps = statistics.median(r["rps"] for r in results[name])
            rows.append((f"{workers} ({service.api_processes})", name, rps,
                         statistics.median(r["p50_ms"] for r in results[name]), rps / base,
                         sum(r["errors"] for r in results[name])))
        return rows
    finally:
        service.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", default="1,default", help="comma-separated API process counts ('default': "
                                                               "what serve picks)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    print(f"wrk -t{args.threads} -c{args.connections}, {args.rounds} rounds of {args.seconds} s per path, "
          f"interleaved; {os.cpu_count()} CPUs")
    print("| serve --workers (API processes) | request | req/s | p50 ms | vs /healthz | non-2xx/3xx |")
    print("| --- | --- | --- | --- | --- | --- |")
    for workers in args.workers.split(","):
        for row in measure(workers.strip(), args):
            print(f"| {row[0]} | {row[1]} | {row[2]:,.0f} | {row[3]:.2f} | {row[4]:.2f}x | {row[5]} |", flush=True)


if __name__ == "__main__":
    main()
