"""Does a slow webhook endpoint delay other jobs? `modelpress serve` (one worker slot) runs jobs back to back,
every other one announcing itself to an endpoint that trickles a header line every 4 s; prints how long each job
waited in the queue (started_at - created_at), for jobs after a trickling one and for jobs after a plain one.

    .venv/bin/python bench/webhook_queue_bench.py [--jobs 8]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import save_onnx  # noqa: E402
from tests.webhook_receiver import Receiver  # noqa: E402


def wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=8)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="modelpress-webhook-queue-"))
    env = {**os.environ, "MODELPRESS_HOME": str(home), "MODELPRESS_WEBHOOK_ALLOW_PRIVATE": "1",
           "MODELPRESS_LATENCY_RUNS": "5"}
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", "8765"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (home / "api_key").exists(), 60)
        client = httpx.Client(base_url="http://127.0.0.1:8765", timeout=30,
                              headers={"Authorization": f"Bearer {(home / 'api_key').read_text().strip()}"})
        wait_for(lambda: client.get("/healthz").status_code == 200, 60)
        model = save_onnx(home / "m.onnx", 64, 256, 10)
        model_id = client.post("/v1/models", files={"file": ("m.onnx", model.read_bytes())}).json()["id"]
        wait_for(lambda: client.get(f"/v1/models/{model_id}").json()["status"] == "ready", 60)
        recipe = {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]}
        with Receiver(trickle_interval=4.0) as receiver:
            ids = []
            for index in range(args.jobs):
                body = {"model_id": model_id, "recipe": recipe}
                if index % 2 == 0:
                    body["webhook_url"] = receiver.url(f"/trickle-{index}")
                ids.append(client.post("/v1/jobs", json=body).json()["id"])
            jobs = [wait_for(lambda j=j: (b := client.get(f"/v1/jobs/{j}").json())["status"] == "succeeded" and b,
                             300) for j in ids]
        runs = [(datetime.fromisoformat(j["finished_at"]) - datetime.fromisoformat(j["started_at"])).total_seconds()
                for j in jobs]
        print(f"{args.jobs} jobs submitted at once, one worker slot; every other job's webhook trickles "
              "(a header line every 4 s):")
        print(f"  job run time median {statistics.median(runs):.2f} s")
        gaps = [(datetime.fromisoformat(b["started_at"]) - datetime.fromisoformat(a["finished_at"])).total_seconds()
                for a, b in zip(jobs, jobs[1:])]
        print(f"  gap between one job's end and the next one's start: median {statistics.median(gaps):.2f} s, "
              f"max {max(gaps):.2f} s")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
