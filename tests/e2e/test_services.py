"""`modelpress api` + `modelpress worker` on PostgreSQL, Redis and S3-compatible storage (moto on loopback)."""

import os
import subprocess

import boto3
import httpx
import pytest

from tests.conftest import create_pg_database, drop_pg_database, free_port
from tests.e2e.conftest import MODELPRESS, http_ok, quantize_through_api, wait_until
from tests.helpers import make_mlp, save_onnx

pytestmark = pytest.mark.e2e


@pytest.fixture
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="artifacts")
    yield endpoint
    server.stop()


@pytest.fixture
def pg_database():
    url = create_pg_database()
    yield url
    drop_pg_database(url)


def test_api_and_worker_on_postgres_redis_s3(tmp_path, processes, pg_database, redis_url, s3_endpoint):
    import torch

    env = {"MODELPRESS_HOME": str(tmp_path / "home"), "MODELPRESS_DATABASE_URL": pg_database,
           "MODELPRESS_BROKER_URL": redis_url, "MODELPRESS_STORAGE_URL": "s3://artifacts/modelpress",
           "MODELPRESS_S3_ENDPOINT_URL": s3_endpoint, "MODELPRESS_LATENCY_RUNS": "20",
           # a job on a queue nobody serves fails after 4 s (once the database has answered for 15 s)
           "MODELPRESS_QUEUE_TIMEOUT": "4", "MODELPRESS_HEARTBEAT_INTERVAL": "1", "MODELPRESS_HEARTBEAT_TIMEOUT": "15",
           "MODELPRESS_DISPATCH_INTERVAL": "0.5"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*MODELPRESS, *args], env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=120)

    assert run("migrate").returncode == 0
    created = run("keys", "create", "--tenant", "acme")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    port = free_port()
    processes.start("api", [*MODELPRESS, "api", "--port", str(port)], env)
    processes.start("worker", [*MODELPRESS, "worker", "--queues", "cpu"], env)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{base}/readyz"), 60, "the API to become ready", processes)

    model = make_mlp(16, 64, 4)
    result = quantize_through_api(base, key, save_onnx(tmp_path / "mlp.onnx", 16, 64, 4), processes, tmp_path,
                                  lambda x: model(torch.from_numpy(x)).detach().numpy())
    objects = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="artifacts")["Contents"]
    keys = [o["Key"] for o in objects]
    job_id = result["job"]["id"]
    assert any(f"jobs/{job_id}/" in k and k.endswith(".onnx") for k in keys)
    assert all(k.startswith("modelpress/tenants/") for k in keys)
    assert 'modelpress_jobs{status="succeeded"} 1.0' in httpx.get(f"{base}/metrics", timeout=10).text

    # The worker records the queues it serves: nobody serves gpu, so a cuda job says it waits, then fails.
    assert httpx.get(f"{base}/readyz", timeout=10).json()["queues_without_workers"] == ["gpu"]
    client = result["client"]
    waiting = client.post("/v1/jobs", json={"model_id": result["model"]["id"], "target": {"device": "cuda"},
                                            "recipe": {"steps": [{"op": "quantize", "method": "dynamic"}]}}).json()
    assert waiting["progress"]["message"] == "waiting: no worker serves queue 'gpu'", waiting
    failed = wait_until(lambda: (j := client.get(f"/v1/jobs/{waiting['id']}").json())["status"] != "queued" and j,
                        60, "the cuda job to fail", processes)
    assert (failed["status"], failed["error"]["code"]) == ("failed", "no_worker"), failed

    # Deleting the finished job removes its objects from S3; the job stays, its downloads say deleted.
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    objects = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="artifacts").get("Contents", [])
    assert not [o["Key"] for o in objects if f"jobs/{job_id}/" in o["Key"]]
    download = client.get(f"/v1/artifacts/{result['artifacts']['model']['id']}/download")
    assert download.status_code == 404 and "deleted" in download.json()["error"]["message"]


def test_gpu_worker_refuses_to_start_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([*MODELPRESS, "worker", "--queues", "gpu"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "MODELPRESS_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "CUDA" in result.stderr
