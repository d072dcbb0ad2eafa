"""Input specs over HTTP with `modelpress serve`: a streaming model uploaded with its specs runs by default; a job
that overrides them with a signal too short fails with input_spec_needed naming the input."""

import json

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import MODELPRESS, http_ok, wait_until
from tests.worker.input_models import STATEFUL_SPECS, save_stateful_model

pytestmark = pytest.mark.e2e


def test_upload_specs_are_the_default_and_a_job_overrides_them(tmp_path, processes):
    home, port = tmp_path / "home", free_port()
    processes.start("serve", [*MODELPRESS, "serve", "--port", str(port)],
                    {"MODELPRESS_HOME": str(home), "MODELPRESS_LATENCY_RUNS": "5"})
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{base}/readyz"), 90, "serve to become ready", processes)
    client = httpx.Client(base_url=base, timeout=30,
                          headers={"Authorization": f"Bearer {(home / 'api_key').read_text().strip()}"})
    path = save_stateful_model(tmp_path / "vad.onnx")
    with open(path, "rb") as fh:
        response = client.post("/v1/models", files={"file": ("vad.onnx", fh)},
                               data={"input_specs": json.dumps(STATEFUL_SPECS)})
    assert response.status_code == 201, response.text
    model_id = response.json()["id"]
    model = wait_until(lambda: (m := client.get(f"/v1/models/{model_id}").json())["status"] != "uploaded" and m,
                       120, "model inspection", processes)
    assert model["status"] == "ready" and model["input_specs"] == STATEFUL_SPECS
    assert model["info"]["suggested_input_specs"]["state"] == {"shape": [2, 1, 8], "batch_axis": 1}

    def finish(body):
        job = client.post("/v1/jobs", json={"model_id": model_id, "preset": "int8-cpu", **body})
        assert job.status_code == 201, job.text
        return wait_until(lambda: (j := client.get(f"/v1/jobs/{job.json()['id']}").json())["status"] in
                          ("succeeded", "failed") and j, 240, "the job to finish", processes)

    default = finish({})
    assert default["status"] == "succeeded", default["error"]
    assert default["input_specs"] == STATEFUL_SPECS
    short = finish({"input_specs": {"input": {"shape": [1, 16]}}})
    assert short["status"] == "failed" and short["error"]["code"] == "input_spec_needed"
    assert short["input_specs"]["input"] == {"shape": [1, 16]}
    assert short["error"]["message"].startswith("the model does not run on the inputs made from its input_specs "
                                                "(input: standard normal, shape [1, 16] float32; state: ")
    assert str(home) not in short["error"]["message"]
    unknown = client.post("/v1/jobs", json={"model_id": model_id, "preset": "int8-cpu",
                                            "input_specs": {"audio": {"shape": [1, 16]}}})
    assert unknown.status_code == 422 and "its inputs are input, state, sr" in unknown.json()["error"]["message"]
