"""`modelpress serve` running a small tune job: its best trial so far is downloadable while it runs, as a provisional
artifact that a better trial replaces; once it succeeds only final artifacts remain, the model card and the HTML
report among them."""

import hashlib
import time

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import MODELPRESS, http_ok, wait_until
from tests.helpers import save_onnx

pytestmark = pytest.mark.e2e
QUANTIZE = {"op": "quantize", "method": "dynamic"}
# Trial 0 (fp16) is the best so far until trial 1 (int8, half its size) replaces it; the two prunings that follow
# (dense files, no smaller) keep the job running with trial 1 provisional. Each trial's latency runs take a second
# or two on this model, long enough to poll.
SEARCH = [{"steps": [{**QUANTIZE, "dtype": "fp16"}]}, {"steps": [{**QUANTIZE, "dtype": "int8"}]},
          {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.1}]},
          {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.2}]}]


def test_a_tune_job_shows_its_best_trial_so_far_then_only_final_artifacts(tmp_path, processes):
    home, port = tmp_path / "home", free_port()
    processes.start("serve", [*MODELPRESS, "serve", "--port", str(port)],
                    {"MODELPRESS_HOME": str(home), "MODELPRESS_LATENCY_RUNS": "4000"})
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{base}/readyz"), 90, "serve to become ready", processes)
    client = httpx.Client(base_url=base, timeout=30,
                          headers={"Authorization": f"Bearer {(home / 'api_key').read_text().strip()}"})
    with open(save_onnx(tmp_path / "mlp.onnx", 256, 1024, 10), "rb") as fh:
        model = client.post("/v1/models", files={"file": ("<b>mlp.onnx", fh)}).json()
    wait_until(lambda: client.get(f"/v1/models/{model['id']}").json()["status"] == "ready", 120, "inspection",
               processes)
    job_id = client.post("/v1/jobs", json={"model_id": model["id"], "tune": {
        "metric": "fidelity", "max_loss": 0.05, "objective": "size", "max_trials": 4, "search": SEARCH}}).json()["id"]

    seen: dict[str, dict] = {}  # provisional artifacts by id, as listed while the job ran
    lasting = None  # trial 1's, downloaded while the job still ran
    deadline = time.monotonic() + 300
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, processes.output()
        provisional = [a for a in job["artifacts"] if a["provisional"]]
        assert len(provisional) <= 1 and all(a["kind"] == "model" for a in provisional)
        seen.update((a["id"], a) for a in provisional)
        if provisional and lasting is None and provisional[0]["filename"] == "<b>mlp-best-so-far-trial1.onnx":
            lasting = provisional[0]
            download = client.get(f"/v1/artifacts/{lasting['id']}/download")
            assert download.status_code == 200, download.text
            assert hashlib.sha256(download.content).hexdigest() == lasting["sha256"]
        time.sleep(0.1)

    assert job["status"] == "succeeded", (job, processes.output())
    assert job["metrics"]["tuning"]["best"] == 1
    assert lasting is not None, f"trial 1 was never seen as the best so far: {seen}"
    assert {a["filename"] for a in seen.values()} <= {f"<b>mlp-best-so-far-trial{i}.onnx" for i in (0, 1)}
    final = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert final == job["artifacts"]
    assert sorted((a["kind"], a["format"], a["provisional"]) for a in final) == [
        ("card", "md", False), ("model", "onnx", False), ("report", "html", False), ("report", "json", False)]
    model_artifact = next(a for a in final if a["kind"] == "model")
    assert model_artifact["sha256"] == lasting["sha256"]  # the best trial's file is what is delivered
    for gone in seen:  # the provisional rows went, and their files with them
        assert client.get(f"/v1/artifacts/{gone}/download").status_code == 404
    assert not [p for p in (home / "artifacts").rglob("*best-so-far*")]

    documents = {a["format"]: client.get(f"/v1/artifacts/{a['id']}/download") for a in final
                 if a["format"] in ("md", "html")}
    card, page = documents["md"], documents["html"]
    assert card.status_code == page.status_code == 200
    assert card.headers["content-type"].startswith("text/markdown") and page.headers["content-type"].startswith(
        "text/html")
    assert card.text.startswith("---\nlibrary_name: \"onnx\"\n") and model["sha256"] in card.text
    assert "<b>" not in card.text and "<b>" not in page.text  # the hostile file name is escaped
    assert page.text.count("<svg") == 5 and "http://" not in page.text and "https://" not in page.text
    report = client.get(f"/v1/jobs/{job_id}/report").json()
    assert report["provenance"]["inputs"]["model"]["sha256"] == model["sha256"]
