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
