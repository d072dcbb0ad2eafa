"""Load and scale benchmark: polling throughput, big uploads, queue latency, worker scaling.

Starts its own service (embedded `modelpress serve`, or `modelpress api` + `modelpress worker` on
PostgreSQL and Redis with --mode redis) in a temp folder, then prints tables:
  1. N concurrent clients: GET /healthz (trivial), GET /v1/jobs/{id} with and without ETag, POST /v1/jobs:
     requests per second, p50/p99 latency, errors; polling throughput as a ratio of /healthz's.
  2. Upload and download of a large model (default 2 GB): throughput and the API process's peak RSS before
     and after (VmHWM from /proc), to show memory stays flat whatever the file size.
  3. Queue latency (job created_at -> started_at, server timestamps), idle and while clients poll.
  4. (--mode redis) jobs per minute draining a queue with 1 and 2 workers.

    .venv/bin/python bench/load_bench.py [--mode embedded|redis] [--clients 32] [--seconds 10] [--big-gb 2]
"""

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import save_onnx  # noqa: E402

RECIPE = {"steps": [{"op": "quantize"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    def __init__(self, mode: str, work: Path):
        self.mode, self.work, self.procs = mode, work, []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The per-tenant rate limit is switched off: this measures what the server can take, not the limit.
        self.env = {**os.environ, "MODELPRESS_HOME": str(work / "home"), "MODELPRESS_LATENCY_RUNS": "5",
                    "MODELPRESS_DISPATCH_INTERVAL": "1", "MODELPRESS_TENANT_REQUESTS_PER_MINUTE": "0",
                    "MODELPRESS_TENANT_MAX_ACTIVE_JOBS": "0"}
        if mode == "redis":
            import psycopg

            name = f"mp_load_{os.getpid()}"
            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                conn.execute(f'CREATE DATABASE "{name}"')
            self.env.update(MODELPRESS_DATABASE_URL=f"postgresql://postgres@127.0.0.1:5432/{name}",
                            MODELPRESS_BROKER_URL="redis://127.0.0.1:6379/11")
            import redis

            redis.Redis.from_url("redis://127.0.0.1:6379/11").flushdb()

    def run(self, name: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=self.env, cwd=ROOT,
                                stdout=open(self.work / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> str:
        if self.mode == "embedded":
            self.api = self.run("serve", "serve", "--port", str(self.port))
        else:
            subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=self.env, cwd=ROOT, check=True,
                           capture_output=True)
            out = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "load"],
                                 env=self.env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            (self.work / "home").mkdir(exist_ok=True)
            (self.work / "home" / "api_key").write_text(out.strip().splitlines()[-1])
            self.api = self.run("api", "api", "--port", str(self.port))
            self.workers = [self.run("worker0", "worker")]
        for _ in range(240):
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return (self.work / "home" / "api_key").read_text().strip()
            except (httpx.HTTPError, FileNotFoundError):
                pass
            time.sleep(0.5)
        sys.exit(f"service did not start: see {self.work}")

    def api_pid(self) -> int:
        return self.api.pid

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def hammer(url: str, headers: dict, clients: int, seconds: float, request) -> dict:
    latencies, errors, statuses = [], 0, {}
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        async def one_client():
            nonlocal errors
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    response = await request(client)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code >= 500:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                latencies.append((time.perf_counter() - start) * 1000)

        started = time.monotonic()
        await asyncio.gather(*[one_client() for _ in range(clients)])
        elapsed = time.monotonic() - started
    return {"rps": len(latencies) / elapsed, "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)), "errors": errors, "statuses": statuses}


def upload(client: httpx.Client, path: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    with open(path, "rb") as fh:
        response = client.post("/v1/models", files={"file": (path.name, fh)}, timeout=3600)
    response.raise_for_status()
    return response.json(), time.perf_counter() - start


def wait_job(client: httpx.Client, job_id: str, until=("succeeded", "failed", "cancelled")) -> dict:
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.05)


def queue_wait(job: dict) -> float:
    from datetime import datetime

    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(job["started_at"]) - parse(job["created_at"])).total_seconds()


def cancel_queued(client: httpx.Client) -> None:
    """The submission test leaves hundreds of queued jobs: cancel them so later timings start from idle."""
    while page := client.get("/v1/jobs", params={"status": "queued", "limit": 200}).json()["data"]:
        for queued in page:
            client.post(f"/v1/jobs/{queued['id']}/cancel")
    while client.get("/v1/jobs", params={"status": "running", "limit": 1}).json()["data"]:
        time.sleep(0.5)


def big_model(path: Path, gigabytes: float) -> Path:
    """A valid .pt2 whose one Linear layer holds `gigabytes` of fp32 weights."""
    import torch

    side = int((gigabytes * 1e9 / 4) ** 0.5)
    layer = torch.nn.Linear(side, side, bias=False)
    torch.export.save(torch.export.export(layer, (torch.zeros(1, side),)), str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["embedded", "redis"], default="embedded")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--big-gb", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--scaling-only", action="store_true", help="(redis mode) only the worker-scaling table")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelpress-load-"))
    service = Service(args.mode, work)
    key = service.start()
    headers = {"Authorization": f"Bearer {key}"}
    client = httpx.Client(base_url=service.url, headers=headers, timeout=60)
    try:
        model, _ = upload(client, save_onnx(work / "tiny.onnx", 16, 32, 4))
        job = wait_job(client, client.post("/v1/jobs", json={"model_id": model["id"], "recipe": RECIPE}).json()["id"])
        etag = client.get(f"/v1/jobs/{job['id']}").headers["etag"]
        if not args.scaling_only:
            front_sections(service, client, headers, model, job, etag, args)
        if args.mode == "redis":
            scaling(service, client, work, args)
    finally:
        service.stop()


def front_sections(service, client, headers, model, job, etag, args) -> None:
    """Polling and submission load, large files, queue latency."""
    work = service.work
    print(f"\nclients and server share this machine ({os.cpu_count()} cores)")
    print(f"\n## 1. {args.clients} concurrent clients for {args.seconds:.0f} s each ({args.mode} mode)")
    print("| request | req/s | p50 ms | p99 ms | 5xx/errors | statuses | ratio to /healthz |")
    print("|---|---|---|---|---|---|---|")
    runs = {
        "GET /healthz": lambda c: c.get("/healthz"),
        "GET /v1/jobs/{id}": lambda c: c.get(f"/v1/jobs/{job['id']}"),
        "GET /v1/jobs/{id} + If-None-Match (304)": lambda c: c.get(f"/v1/jobs/{job['id']}",
                                                                      headers={"If-None-Match": etag}),
        "POST /v1/jobs": lambda c: c.post("/v1/jobs", json={"model_id": model["id"], "recipe": {
            "steps": [{"op": "analyze"}]}}),
    }
    trivial = None
    for name, request in runs.items():
        result = asyncio.run(hammer(service.url, headers, args.clients, args.seconds, request))
        trivial = trivial or result["rps"]
        statuses = ", ".join(f"{code}: {count}" for code, count in sorted(result["statuses"].items()))
        print(f"| {name} | {result['rps']:.0f} | {result['p50']:.1f} | {result['p99']:.1f} | "
              f"{result['errors']} | {statuses} | {result['rps'] / trivial:.2f} |")

    cancel_queued(client)

    print("\n## 2. Large uploads and downloads (API peak RSS, VmHWM)")
    print("| file | upload MB/s | download MB/s | API peak RSS before MB | after MB |")
    print("|---|---|---|---|---|")
    for gigabytes in (0.1, args.big_gb):
        path = big_model(work / f"big-{gigabytes}.pt2", gigabytes)
        before = peak_rss_mb(service.api_pid())
        uploaded, seconds = upload(client, path)
        size_mb = path.stat().st_size / 1e6
        start = time.perf_counter()
        with client.stream("GET", f"/v1/models/{uploaded['id']}/download", timeout=3600) as response:
            received = sum(len(chunk) for chunk in response.iter_bytes(1 << 20))
        download_s = time.perf_counter() - start
        assert received == path.stat().st_size
        print(f"| {size_mb:,.0f} MB | {size_mb / seconds:.0f} | {size_mb / download_s:.0f} | {before:.0f} | "
              f"{peak_rss_mb(service.api_pid()):.0f} |")
        client.delete(f"/v1/models/{uploaded['id']}")
        path.unlink()

    print("\n## 3. Queue latency (created_at -> started_at)")
    idle = []
    for _ in range(5):
        created = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"steps": [
            {"op": "analyze"}]}}).json()
        idle.append(queue_wait(wait_job(client, created["id"])))
    print(f"| {args.mode} idle | median {statistics.median(idle):.2f} s | max {max(idle):.2f} s |")

    async def poll_while(seconds):
        return await hammer(service.url, headers, args.clients, seconds,
                            lambda c: c.get(f"/v1/jobs/{job['id']}"))

    loaded = []
    for _ in range(3):
        created = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"steps": [
            {"op": "analyze"}]}}).json()
        load = asyncio.run(poll_while(3))
        loaded.append(queue_wait(wait_job(client, created["id"])))
    print(f"| {args.mode} while {args.clients} clients poll | median {statistics.median(loaded):.2f} s | "
          f"max {max(loaded):.2f} s | ({load['rps']:.0f} polls/s) |")


def scaling(service, client, work: Path, args) -> None:
    """Jobs with real work (a 25 MB MLP quantized) drained by one worker, then by two."""
    heavy, _ = upload(client, save_onnx(work / "heavy.onnx", 1024, 2048, 16))
    wait_job(client, client.post("/v1/jobs", json={"model_id": heavy["id"], "recipe": RECIPE}).json()["id"])
    print("\n## 4. Draining a queue of jobs (25 MB MLP, int8)")
    print("| workers | jobs | seconds | jobs/min |")
    print("|---|---|---|---|")
    for workers in (1, 2):
        while len(service.workers) < workers:
            service.workers.append(service.run(f"worker{len(service.workers)}", "worker"))
            time.sleep(10)
        start = time.monotonic()
        ids = [client.post("/v1/jobs", json={"model_id": heavy["id"], "recipe": RECIPE}).json()["id"]
               for _ in range(args.jobs)]
        for job_id in ids:
            wait_job(client, job_id)
        elapsed = time.monotonic() - start
        print(f"| {workers} | {args.jobs} | {elapsed:.1f} | {args.jobs / elapsed * 60:.1f} |", flush=True)


if __name__ == "__main__":
    main()
