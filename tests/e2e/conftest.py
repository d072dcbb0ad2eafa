"""Real processes: the `modelpress` command under test, spoken to over HTTP."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

MODELPRESS = [sys.executable, "-m", "app.cli"]


class Processes:
    """Starts commands in their own process groups and kills whole groups at teardown."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log_path = self.logs / f"{name}.log"
        self.running.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self.kill(proc)

    def output(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log_path.read_text(errors='replace')[-4000:]}"
                         for p in self.running)


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


def wait_until(predicate, timeout: float, what: str, procs: Processes | None = None, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}\n{procs.output() if procs else ''}")


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def quantize_through_api(base: str, key: str, model_path: Path, procs: Processes, tmp_path: Path,
                         reference, timeout: float = 240) -> dict:
    """Upload -> wait ready -> submit int8 job -> poll -> download; checks the result runs and is faithful."""
    import onnxruntime as ort

    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    with open(model_path, "rb") as fh:
        response = client.post("/v1/models", files={"file": (model_path.name, fh)})
    assert response.status_code == 201, response.text
    model = response.json()
    model = wait_until(lambda: (m := client.get(f"/v1/models/{model['id']}").json())["status"] != "uploaded" and m,
                       timeout, "model inspection", procs)
    assert model["status"] == "ready", model
    response = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": {"steps": [
        {"op": "quantize", "method": "dynamic", "dtype": "int8"}]}})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = wait_until(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"] in
                     ("succeeded", "failed", "cancelled") and j, timeout, "the job to finish", procs)
    assert job["status"] == "succeeded", (job, procs.output())
    report = client.get(f"/v1/jobs/{job_id}/report").json()
    assert report == job["metrics"]
    listed = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert sorted((a["kind"], a["format"], a["provisional"]) for a in listed) == [
        ("card", "md", False), ("model", "onnx", False), ("report", "html", False), ("report", "json", False)]
    artifacts = {a["kind"]: a for a in listed if a["format"] != "html"}  # the JSON report as "report"
    download = client.get(f"/v1/artifacts/{artifacts['model']['id']}/download")
    assert download.status_code == 200
    assert download.headers["etag"] == f'"{artifacts["model"]["sha256"]}"'
    out = tmp_path / "downloaded.onnx"
    out.write_bytes(download.content)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    spec = model["info"]["inputs"][0]
    x = np.random.default_rng(7).standard_normal(spec["shape"]).astype(np.float32)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    want = reference(x)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.99, cosine
    return {"job": job, "model": model, "artifacts": artifacts, "client": client}
