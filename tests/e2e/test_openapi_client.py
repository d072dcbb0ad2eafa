"""A client generated from the service's own /openapi.json by a standard generator (openapi-python-client)
works against the real service: `modelpress serve` (API and worker), a tiny model uploaded as multipart, a dry run
that finds the worker serving its queue, a job polled to success, its artifacts listed and downloaded."""

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.api.main import create_app
from app.core.config import Settings
from tests.conftest import free_port
from tests.e2e.conftest import MODELPRESS, http_ok, wait_until
from tests.helpers import save_onnx

pytestmark = pytest.mark.e2e
PACKAGE = "modelpress_client"


def start_generator(schema: dict, folder: Path) -> subprocess.Popen:
    """Run the generator as a user would, with `--fail-on-warning`: a schema it cannot read well is at fault."""
    (folder / "openapi.json").write_text(json.dumps(schema))
    bin_dir = Path(sys.executable).parent  # the generator and the ruff it formats with live beside this Python
    return subprocess.Popen(
        [str(bin_dir / "openapi-python-client"), "generate", "--path", str(folder / "openapi.json"),
         "--output-path", str(folder / PACKAGE), "--meta", "none", "--fail-on-warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=folder,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"})


@pytest.fixture
def generated(tmp_path):
    """Imports of the generated package, removed again afterwards."""
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


def test_a_generated_client_compresses_a_model_end_to_end(generated, processes):
    home, port = generated / "home", free_port()
    processes.start("serve", [*MODELPRESS, "serve", "--port", str(port)],
                    {"MODELPRESS_HOME": str(home), "MODELPRESS_LATENCY_RUNS": "5", "MODELPRESS_LATENCY_WARMUP": "1"})
    base = f"http://127.0.0.1:{port}"
    # The schema is the code's: generate while the service starts, then check it serves that very schema.
    schema = create_app(Settings(home=generated / "schema-home"), housekeeping=False).openapi()
    generator = start_generator(schema, generated)
    try:
        wait_until(lambda: http_ok(f"{base}/readyz"), 90, "serve to become ready", processes)
        output, _ = generator.communicate(timeout=120)
    finally:
        if generator.poll() is None:
            generator.kill()
            generator.wait()
    assert httpx.get(f"{base}/openapi.json").json() == schema
    assert generator.returncode == 0 and "Warning" not in output, output
    client_module = importlib.import_module(f"{PACKAGE}.client")
    models = importlib.import_module(f"{PACKAGE}.models")
    types = importlib.import_module(f"{PACKAGE}.types")
    upload_model = importlib.import_module(f"{PACKAGE}.api.models.upload_model")
    get_model = importlib.import_module(f"{PACKAGE}.api.models.get_model")
    create_job = importlib.import_module(f"{PACKAGE}.api.jobs.create_job")
    get_job = importlib.import_module(f"{PACKAGE}.api.jobs.get_job")
    list_artifacts = importlib.import_module(f"{PACKAGE}.api.jobs.list_artifacts")
    download_artifact = importlib.import_module(f"{PACKAGE}.api.artifacts.download_artifact")

    client = client_module.AuthenticatedClient(base_url=base, token=(home / "api_key").read_text().strip(),
                                               timeout=httpx.Timeout(30))
    with client, open(save_onnx(generated / "mlp.onnx", 16, 64, 4), "rb") as fh:
        body = models.UploadModelBody(file=types.File(payload=fh, file_name="mlp.onnx"), name="tiny mlp")
        uploaded = upload_model.sync_detailed(client=client, body=body)
        assert uploaded.status_code == 201, uploaded.content
        model = uploaded.parsed
        assert isinstance(model, models.ModelPublic) and model.name == "tiny mlp"
        model = wait_until(lambda: (m := get_model.sync(model.id, client=client)).status != "uploaded" and m, 90,
                           "inspection", processes)
        assert model.status == "ready", model

        recipe = models.Recipe(steps=[models.QuantizeStep(op="quantize", method=models.QuantizeStepMethod.DYNAMIC)])
        planned = create_job.sync_detailed(client=client, body=models.JobCreate(model_id=model.id, recipe=recipe,
                                                                                dry_run=True))
        assert planned.status_code == 200 and isinstance(planned.parsed, models.JobPlan), planned.content
        assert planned.parsed.queue.workers == models.PlannedQueueWorkers.AVAILABLE  # the embedded worker's beat
        assert planned.parsed.recipe.to_dict()["steps"][0]["granularity"] == "per_channel"

        submitted = create_job.sync_detailed(client=client, body=models.JobCreate(model_id=model.id, recipe=recipe),
                                             idempotency_key="openapi-client-1")
        assert submitted.status_code == 201 and isinstance(submitted.parsed, models.JobPublic), submitted.content
        job_id = submitted.parsed.id
        deadline = time.monotonic() + 180
        while (job := get_job.sync(job_id, client=client)).status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, processes.output()
            time.sleep(0.5)
        assert job.status == "succeeded", (job.to_dict(), processes.output())
        assert job.metrics["compression_ratio"] > 1

        artifacts = list_artifacts.sync(job_id, client=client)
        assert isinstance(artifacts, models.ArtifactsPublic)
        by_kind = {(artifact.kind, artifact.format_): artifact for artifact in artifacts.data}
        assert ("model", "onnx") in by_kind and ("report", "json") in by_kind, by_kind
        report = download_artifact.sync_detailed(by_kind["report", "json"].id, client=client)
        assert report.status_code == 200, report.content
        assert json.loads(report.content) == {**job.metrics.to_dict(), "job_id": job_id, "model_id": model.id}
