"""`modelpress serve`: one command, embedded defaults (SQLite, filesystem broker, local files)."""

import pytest

from tests.conftest import free_port
from tests.e2e.conftest import MODELPRESS, http_ok, quantize_through_api, wait_until
from tests.helpers import make_mlp, save_pt2

pytestmark = pytest.mark.e2e


def test_serve_upload_quantize_download(tmp_path, processes):
    import torch

    home, port = tmp_path / "home", free_port()
    processes.start("serve", [*MODELPRESS, "serve", "--port", str(port)],
                    {"MODELPRESS_HOME": str(home), "MODELPRESS_LATENCY_RUNS": "20"})
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{base}/readyz"), 90, "serve to become ready", processes)
    key = (home / "api_key").read_text().strip()
    assert key in (processes.running[0].log_path.read_text())  # printed for the user too
    model = make_mlp(32, 128, 8)
    result = quantize_through_api(base, key, save_pt2(tmp_path / "mlp.pt2", 32, 128, 8), processes, tmp_path,
                                  lambda x: model(torch.from_numpy(x)).detach().numpy())
    metrics = result["job"]["metrics"]
    assert metrics["compression_ratio"] > 2.5 and metrics["fidelity"]["cosine_mean"] > 0.99
    assert (home / "modelpress.db").exists() and any((home / "artifacts").rglob("*.onnx"))
    ranged = result["client"].get(f"/v1/artifacts/{result['artifacts']['report']['id']}/download",
                                  headers={"Range": "bytes=0-0"})
    assert ranged.status_code == 206 and ranged.content == b"{"


def test_many_concurrent_submissions_do_not_stall(tmp_path, processes):
    """More concurrent requests than pooled database connections: each must still be answered (a sync database
    call on the event loop once deadlocked the server here)."""
    import asyncio

    import httpx

    from tests.helpers import save_onnx

    home, port = tmp_path / "home", free_port()
    processes.start("serve", [*MODELPRESS, "serve", "--port", str(port)],
                    {"MODELPRESS_HOME": str(home), "MODELPRESS_TENANT_REQUESTS_PER_MINUTE": "0"})
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{base}/readyz"), 90, "serve to become ready", processes)
    headers = {"Authorization": f"Bearer {(home / 'api_key').read_text().strip()}"}
    with open(save_onnx(tmp_path / "m.onnx"), "rb") as fh:
        model_id = httpx.post(f"{base}/v1/models", headers=headers, files={"file": ("m.onnx", fh)}).json()["id"]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30,
                                     limits=httpx.Limits(max_connections=64)) as client:
            posts = [client.post("/v1/jobs", json={"model_id": model_id, "recipe": {"steps": [{"op": "analyze"}]}})
                     for _ in range(48)]
            gets = [client.get("/v1/models") for _ in range(48)]
            return [r.status_code for r in await asyncio.gather(*posts, *gets)]

    statuses = asyncio.run(burst())
    assert statuses.count(201) == 48 and statuses.count(200) == 48, statuses


def test_serve_with_two_api_processes_shares_one_rate_limit(tmp_path, processes):
    """`serve --workers 2`: two API processes behind one port; the tenant's bucket is one file they both lock, so
    the limit holds whichever process answers, and a job's ETag is the same from either."""
    import httpx

    home, port = tmp_path / "home", free_port()
    server = processes.start("serve", [*MODELPRESS, "serve", "--port", str(port), "--workers", "2"],
                             {"MODELPRESS_HOME": str(home), "MODELPRESS_TENANT_REQUESTS_PER_MINUTE": "12"})
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{base}/readyz"), 90, "serve to become ready", processes)
    wait_until(lambda: server.log_path.read_text().count("Application startup complete") == 2, 60,
               "both API processes", processes)
    headers = {"Authorization": f"Bearer {(home / 'api_key').read_text().strip()}"}
    statuses = [httpx.get(f"{base}/v1/models", headers=headers).status_code for _ in range(30)]  # a connection each
    assert 12 <= statuses.count(200) <= 13 and statuses.count(429) >= 17, statuses
