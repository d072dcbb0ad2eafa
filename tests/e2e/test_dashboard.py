"""The dashboard at /ui in a real browser (Debian's chromium driven by Playwright) against a real service: a
`modelpress api` and a `modelpress worker` on PostgreSQL and Redis. Every page is watched: a console error, a
failed request or a request to any other host fails the test that opened it. The main pages are saved as
screenshots at 1280 and 390 px into docs/img (the README shows them)."""

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from tests.conftest import create_pg_database, drop_pg_database, free_port
from tests.e2e.conftest import MODELPRESS, Processes, http_ok, wait_until

playwright_api = pytest.importorskip("playwright.sync_api", reason="the test extra's playwright is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)")]
expect = playwright_api.expect

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "img"
WIDTHS = {"wide": (1280, 860), "narrow": (390, 844)}
JOB_TIMEOUT_MS = 240_000
HEADINGS = {"#/models": "Models and datasets", "#/new": "New job", "#/jobs/": re.compile("^Job"), "#/jobs": "Jobs",
            "#/keys": "Keys and webhooks"}
HOSTILE_NAME = '<img src=x onerror="window.__owned=1">mlp'


def tiny_onnx(path: Path, seed: int = 0) -> Path:
    """A 16 -> 32 -> 4 MLP as ONNX, built from its graph (no exporter): enough to inspect and quantize."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
               for name, shape in (("w1", (16, 32)), ("b1", (32,)), ("w2", (32, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@dataclass
class Service:
    base: str
    keys: dict[str, str]
    processes: Processes
    folder: Path

    def client(self, tenant: str) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.keys[tenant]}"}, timeout=30)


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_url) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("dashboard")
    database_url = create_pg_database()
    env = {"MODELPRESS_HOME": str(folder / "home"), "MODELPRESS_DATABASE_URL": database_url,
           "MODELPRESS_BROKER_URL": redis_url, "MODELPRESS_LATENCY_RUNS": "10",
           "MODELPRESS_EVENT_POLL_INTERVAL": "0.2", "MODELPRESS_WEBHOOK_ALLOW_PRIVATE": "1",
           # the cancel test's job waits on the gpu queue, which no worker here serves
           "MODELPRESS_QUEUE_TIMEOUT": "3600"}

    def run(*args: str) -> str:
        done = subprocess.run([*MODELPRESS, *args], env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    processes = Processes(folder)
    try:
        run("migrate")
        keys = {tenant: run("keys", "create", "--tenant", tenant) for tenant in ("acme", "globex", "initech")}
        port = free_port()
        processes.start("api", [*MODELPRESS, "api", "--port", str(port)], env)
        processes.start("worker", [*MODELPRESS, "worker", "--queues", "cpu"], env)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{base}/readyz"), 60, "the API to become ready", processes)
        yield Service(base, keys, processes, folder)
    finally:
        processes.stop_all()
        drop_pg_database(database_url)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@dataclass
class Watch:
    """What the browser did that a clean page never does. Tests that provoke an error answer say which."""

    origin: str
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)
    expected: list[tuple[int, str]] = field(default_factory=list)  # (status, path) answers a test provokes

    def expect_answer(self, status: int, path: str) -> None:
        self.expected.append((status, path))

    def _expected(self, status: int, url: str) -> bool:
        return any(status == s and urlsplit(url).path.startswith(p) for s, p in self.expected)

    def on_console(self, message) -> None:
        if message.type != "error":
            return
        # Chromium logs every 4xx answer as "Failed to load resource"; the answers a test provoked are expected.
        location = message.location.get("url", "")
        status = re.search(r"status of (\d{3})", message.text)
        if status and self._expected(int(status.group(1)), location):
            return
        self.console_errors.append(f"{message.text} ({location})")

    def on_response(self, response) -> None:
        if response.status >= 400 and not self._expected(response.status, response.url):
            self.failed_requests.append(f"{response.status} {response.request.method} {response.url}")

    def on_request_failed(self, request) -> None:
        # Leaving a page cancels what it was still reading (its event stream, a list) on purpose.
        if request.failure == "net::ERR_ABORTED" and request.method == "GET":
            return
        self.failed_requests.append(f"{request.failure} {request.method} {request.url}")

    def route(self, route) -> None:
        """Every request passes here: one for anywhere but the service fails the test and never leaves."""
        parts = urlsplit(route.request.url)
        if parts.scheme in ("blob", "data") or f"{parts.scheme}://{parts.netloc}" == self.origin:
            route.continue_()
        else:
            self.foreign_requests.append(route.request.url)
            route.abort()

    def check(self) -> None:
        assert not self.foreign_requests, f"requests left the service: {self.foreign_requests}"
        assert not self.console_errors, f"console errors: {self.console_errors}"
        assert not self.failed_requests, f"failed requests: {self.failed_requests}"


class Dashboard:
    def __init__(self, context, service: Service, watch: Watch):
        self.context, self.service, self.watch = context, service, watch
        self.page = self.new_page()

    def new_page(self):
        page = self.context.new_page()
        page.on("console", self.watch.on_console)
        page.on("pageerror", lambda error: self.watch.console_errors.append(f"uncaught: {error}"))
        page.on("response", self.watch.on_response)
        page.on("requestfailed", self.watch.on_request_failed)
        return page

    def sign_in(self, tenant: str = "acme", page=None) -> None:
        page = page or self.page
        page.goto(f"{self.service.base}/ui")
        key_field = page.get_by_label("API key")
        expect(key_field).to_be_focused()
        page.keyboard.type(self.service.keys[tenant])
        page.keyboard.press("Enter")
        expect(page.get_by_role("navigation", name="Main")).to_be_visible()

    def open(self, fragment: str, page=None) -> None:
        """Opens a page by its fragment (no reload) and waits for its heading."""
        page = page or self.page
        page.evaluate("fragment => { location.hash = fragment; }", fragment)
        heading = next(h for prefix, h in HEADINGS.items() if fragment.startswith(prefix))
        expect(page.locator("main h1")).to_have_text(heading)


@pytest.fixture
def dashboard(browser, service) -> Iterator[Dashboard]:
    watch = Watch(service.base)
    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    context.route("**/*", watch.route)
    try:
        yield Dashboard(context, service, watch)
        watch.check()
    finally:
        context.close()


def upload_model(client: httpx.Client, path: Path, name: str) -> dict:
    with open(path, "rb") as fh:
        response = client.post("/v1/models", files={"file": (path.name, fh)}, data={"name": name})
    assert response.status_code == 201, response.text
    model_id = response.json()["id"]
    return wait_until(lambda: (m := client.get(f"/v1/models/{model_id}").json())["status"] != "uploaded" and m,
                      120, "the model's inspection")


@pytest.fixture(scope="module")
def finished_job(service, tmp_path_factory) -> dict:
    """A tenant's model and a finished int8 job with a webhook to nowhere: data to show."""
    client = service.client("acme")
    model = upload_model(client, tiny_onnx(tmp_path_factory.mktemp("m") / "mlp.onnx", seed=1), "mlp.onnx")
    assert model["status"] == "ready", model
    job = client.post("/v1/jobs", json={"model_id": model["id"], "name": "mlp int8", "preset": "int8-cpu",
                                        "webhook_url": f"http://127.0.0.1:{free_port()}/hook"}).json()
    return wait_until(lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["status"] in
                      ("succeeded", "failed", "cancelled") and j, 240, "the job to finish", service.processes)


@pytest.fixture(scope="module")
def tuned_job(service, finished_job) -> dict:
    """A tune job over two candidates on the same model: trials to draw."""
    client = service.client("acme")
    search = [{"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]},
              {"steps": [{"op": "quantize", "method": "weight_only", "dtype": "int4", "group_size": 16}]}]
    job = client.post("/v1/jobs", json={"model_id": finished_job["model_id"], "name": "mlp tuned", "tune": {
        "metric": "fidelity", "max_loss": 0.02, "objective": "size", "max_trials": 2, "search": search}})
    assert job.status_code == 201, job.text
    done = wait_until(lambda: (j := client.get(f"/v1/jobs/{job.json()['id']}").json())["status"] in
                      ("succeeded", "failed", "cancelled") and j, 240, "the tune job to finish", service.processes)
    assert done["status"] == "succeeded", done
    return done


def test_upload_run_a_preset_watch_it_live_and_download_the_model(dashboard, service, tmp_path):
    page = dashboard.page
    dashboard.sign_in()
    # A second tab on the job list: it must show the new job and its end without being reloaded.
    list_page = dashboard.new_page()
    dashboard.sign_in(page=list_page)
    dashboard.open("#/jobs", page=list_page)
    expect(list_page.locator(".live-state")).to_have_text(re.compile("Live"))
    list_page.evaluate("window.__sameDocument = true")

    dashboard.open("#/models")
    page.get_by_label("Model file").set_input_files(str(tiny_onnx(tmp_path / "browser-mlp.onnx")))
    expect(page.locator(".upload-status").first).to_have_text("Uploaded browser-mlp.onnx.")
    expect(page.get_by_role("progressbar").first).to_have_attribute("value", "1")
    row = page.locator("tr", has_text="browser-mlp.onnx")
    expect(row.locator(".badge")).to_have_text("ready", timeout=120_000)
    expect(row).to_contain_text("x [4, 16] float32")

    dashboard.open("#/new")
    page.get_by_label("Model", exact=True).select_option(label="browser-mlp.onnx (onnx)")
    page.get_by_label("Preset", exact=True).select_option("int8-cpu")
    expect(page.locator(".preset-about")).to_contain_text("Needs no dataset.")
    page.get_by_role("button", name="Submit job").click()
    expect(page).to_have_url(re.compile(r"#/jobs/job_"))
    job_id = page.url.rsplit("/", 1)[1]
    page.evaluate("window.__sameDocument = true")
    expect(page.locator(".job-status .badge")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
    assert page.evaluate("window.__sameDocument") is True  # watched live, never reloaded
    expect(page.get_by_role("progressbar", name="Progress")).to_have_attribute("value", "1")
    events = page.get_by_role("list", name="Event timeline").locator("li").all_inner_texts()
    assert events[0].startswith("queued") and events[-1].startswith("succeeded"), events
    steps = page.get_by_role("list", name="Step timeline").locator("li").all_inner_texts()
    assert len(steps) == 1 and steps[0].startswith("1. quantize done, "), steps
    assert page.locator("svg.chart").count() >= 3  # size, latency, fidelity
    expect(page.locator("figure.chart-figure").first).to_contain_text("Size")

    client = service.client("acme")
    job = client.get(f"/v1/jobs/{job_id}").json()
    provenance = page.locator("details", has_text="Inputs, recipe")
    provenance.locator("summary").click()
    expect(provenance).to_contain_text(job["metrics"]["provenance"]["inputs"]["model"]["sha256"])
    model_artifact = next(a for a in job["artifacts"] if a["kind"] == "model")
    assert page.get_by_role("button", name=re.compile("^Download ")).count() == len(job["artifacts"])
    with page.expect_download() as info:
        page.get_by_role("button", name=f"Download {model_artifact['filename']}").click()
    download = info.value
    assert download.suggested_filename == model_artifact["filename"]
    from_api = client.get(f"/v1/artifacts/{model_artifact['id']}/download")
    assert Path(download.path()).read_bytes() == from_api.content
    expect(page.locator(".download-status")).to_contain_text("Saved")

    list_row = list_page.locator(f'tr[data-job-id="{job_id}"]')
    expect(list_row.locator(".badge")).to_have_text("succeeded")
    assert list_page.evaluate("window.__sameDocument") is True

    # Deleting the job's files takes a second click; the job and its report stay.
    page.get_by_role("button", name="Delete files").click()
    page.get_by_role("button", name="Confirm: delete this job's files").click()
    expect(page.locator(".action-message")).to_have_text("The job's files are deleted; its report stays.")
    expect(page.get_by_role("button", name=re.compile("^Download "))).to_have_count(0)
    expect(page.locator("dl.summary")).to_contain_text("Files deleted")
    expect(page.locator("svg.chart")).to_have_count(3)
    assert client.get(f"/v1/jobs/{job_id}").json()["deleted_at"] is not None


def test_a_dataset_dropped_on_the_page_is_uploaded_and_offered_to_jobs(dashboard, tmp_path):
    buffer = tmp_path / "calibration.npz"
    np.savez(buffer, x=np.random.default_rng(3).standard_normal((8, 16)).astype(np.float32))
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open("#/models")
    dropped = page.evaluate_handle("""([name, bytes]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], name));
        return transfer;
    }""", ["calibration.npz", list(buffer.read_bytes())])
    zone = page.locator(".drop-zone", has=page.get_by_label("Dataset file"))
    zone.dispatch_event("dragover", {"dataTransfer": dropped})
    expect(zone).to_have_class(re.compile(r"\bover\b"))
    zone.dispatch_event("drop", {"dataTransfer": dropped})
    expect(zone.locator(".upload-status")).to_have_text("Uploaded calibration.npz.")
    row = page.get_by_role("table", name="Datasets").locator("tr", has_text="calibration.npz")
    expect(row.locator('td[data-label="Samples"]')).to_have_text("8")
    expect(row.locator('td[data-label="Labels"]')).to_have_text("no")
    dashboard.open("#/new")
    expect(page.get_by_label("Calibration dataset").locator("option", has_text="calibration.npz")).to_have_count(1)


def test_a_queued_job_is_cancelled_from_its_page(dashboard, service, finished_job):
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open("#/new")
    page.get_by_label("Model", exact=True).select_option(finished_job["model_id"])
    page.get_by_label("a recipe (JSON)").check()
    page.get_by_label("Recipe (JSON)", exact=True).fill(json.dumps({"steps": [{"op": "quantize", "dtype": "fp16"}]}))
    page.get_by_label("Device").select_option("cuda")  # the gpu queue: no worker here serves it
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator(".job-status .badge")).to_have_text("queued")
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator(".job-status .badge")).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    job_id = page.url.rsplit("/", 1)[1]
    assert service.client("acme").get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_refusals_show_the_apis_message_next_to_the_field(dashboard, service, finished_job, tmp_path):
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open("#/new")
    page.get_by_label("Model", exact=True).select_option(finished_job["model_id"])
    page.get_by_label("a recipe (JSON)").check()
    recipe = page.get_by_label("Recipe (JSON)", exact=True)
    recipe.fill("{\"steps\": [")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator(f"#{recipe.get_attribute('id')}-error")).to_contain_text("Not a JSON object")

    dashboard.watch.expect_answer(422, "/v1/jobs")
    recipe.fill(json.dumps({"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int3"}]}))
    page.get_by_role("button", name="Submit job").click()
    error = page.locator(f"#{recipe.get_attribute('id')}-error")
    expect(error).to_contain_text("recipe.steps.0")
    expect(error).to_contain_text("dtype")
    expect(recipe).to_have_attribute("aria-invalid", "true")
    expect(recipe).to_be_focused()
    assert service.client("acme").get("/v1/jobs", params={"status": "queued"}).json()["data"] == []

    dashboard.watch.expect_answer(415, "/v1/models")
    dashboard.open("#/models")
    (tmp_path / "notes.txt").write_text("not a model\n")
    page.get_by_label("Model file").set_input_files(str(tmp_path / "notes.txt"))
    refused = service.client("acme").post("/v1/models", files={"file": ("notes.txt", b"not a model\n")})
    assert refused.status_code == 415
    expect(page.locator(".upload-status").first).to_have_text(f"Refused: {refused.json()['error']['message']}")


def test_a_dry_run_shows_the_plan_and_creates_nothing(dashboard, service, finished_job):
    page = dashboard.page
    client = service.client("acme")
    before = len(client.get("/v1/jobs").json()["data"])
    dashboard.sign_in()
    dashboard.open("#/new")
    page.get_by_label("Model", exact=True).select_option(finished_job["model_id"])
    page.get_by_label("Preset", exact=True).select_option("int8-cpu")
    page.get_by_role("button", name="Dry run").click()
    plan = page.get_by_role("region", name="Plan (nothing was created)")
    expect(plan).to_be_visible()
    expect(plan.locator("dl.summary")).to_contain_text("mlp.onnx")
    expect(plan.locator("dl.summary")).to_contain_text("cpu (workers: available)")
    plan.get_by_text("The whole plan (JSON)").click()
    expect(plan.get_by_label("The plan as JSON")).to_contain_text('"dry_run": true')
    assert len(client.get("/v1/jobs").json()["data"]) == before


def test_names_a_tenant_chose_are_shown_as_text(dashboard, service, tmp_path):
    client = service.client("initech")
    with open(tiny_onnx(tmp_path / "m.onnx"), "rb") as fh:
        model = client.post("/v1/models", files={"file": ("m.onnx", fh)}, data={"name": HOSTILE_NAME}).json()
    job = client.post("/v1/jobs", json={"model_id": model["id"], "name": HOSTILE_NAME, "target": {"device": "cuda"},
                                        "recipe": {"steps": [{"op": "quantize", "method": "dynamic"}]}}).json()
    page = dashboard.page
    dashboard.sign_in("initech")
    for fragment in ("#/models", "#/jobs", f"#/jobs/{job['id']}"):
        dashboard.open(fragment)
        expect(page.locator("main :is(td, h1)", has_text=HOSTILE_NAME).first).to_be_visible()
        assert page.locator("main img").count() == 0 and page.evaluate("window.__owned") is None, fragment
    expect(page.locator("main h1")).to_have_text(f"Job {HOSTILE_NAME}")
    expect(page.locator(".job-status .badge")).to_have_text("queued")
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202


def test_a_new_key_is_shown_once_then_revoked_and_deliveries_are_listed(dashboard, service, finished_job):
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open("#/keys")
    page.get_by_label("Name of the new key (optional)").fill("ci <b>key</b>")
    page.get_by_role("button", name="Create key").click()
    shown = page.get_by_label("New API key: copy it now, it is shown only this once")
    expect(shown).to_have_value(re.compile(r"^mp_"))
    new_key = shown.input_value()
    row = page.locator("tr", has_text="ci <b>key</b>")
    expect(row.locator(".badge")).to_have_text("active")
    dashboard.open("#/jobs")
    dashboard.open("#/keys")
    expect(page.locator("tr", has_text="ci <b>key</b>")).to_have_count(1)
    assert new_key not in page.content()
    page.locator("tr", has_text="ci <b>key</b>").get_by_role("button", name=re.compile("^Revoke")).click()
    expect(page.locator("tr", has_text="ci <b>key</b>").locator(".badge")).to_have_text("revoked")
    assert httpx.get(f"{service.base}/v1/models", headers={"Authorization": f"Bearer {new_key}"}).status_code == 401

    deliveries = page.get_by_role("table", name=re.compile("webhook deliveries"))
    expect(deliveries.locator("tr", has_text=finished_job["id"])).to_have_count(1, timeout=60_000)
    page.get_by_role("button", name="Show").click()
    secret = service.client("acme").get("/v1/webhooks/secret").json()["secret"]
    expect(page.get_by_label("Webhook signing secret")).to_have_value(secret)

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    # The revoked key cannot sign in: the API's message under the field, nothing stored.
    dashboard.watch.expect_answer(401, "/v1/presets")
    page.get_by_label("API key").fill(new_key)
    page.get_by_role("button", name="Sign in").click()
    refusal = httpx.get(f"{service.base}/v1/presets", headers={"Authorization": f"Bearer {new_key}"}).json()
    expect(page.locator(".field-error")).to_have_text(refusal["error"]["message"])
    assert page.evaluate("sessionStorage.length") == 0


def test_a_tune_jobs_trials_are_drawn_with_the_pareto_front_and_the_tolerance(dashboard, tuned_job):
    page = dashboard.page
    dashboard.sign_in()
    dashboard.open(f"#/jobs/{tuned_job['id']}")
    tuning = tuned_job["metrics"]["tuning"]
    chart = page.locator("figure.chart-figure", has_text="Tuning trials")
    expect(chart).to_be_visible()
    measured = [t for t in tuning["trials"] if t.get("metric") is not None and not t.get("error")]
    expect(chart.locator("circle.dot")).to_have_count(len(measured))
    expect(chart.locator("line.tolerance-line")).to_have_count(1)
    expect(chart.locator("polyline.pareto-line")).to_have_count(1 if tuning["pareto_front"] else 0)
    expect(chart.locator("circle.chosen-ring")).to_have_count(1)
    expect(chart.locator("ul.legend")).to_contain_text(f"chosen (trial {tuning['best']})")
    page.screenshot(path=str(SCREENSHOTS / "dashboard-tuned-job-1280.png"), full_page=True)


def test_another_tenant_sees_none_of_the_first_tenants_data(dashboard, service, finished_job):
    page = dashboard.page
    dashboard.sign_in("globex")
    dashboard.open("#/models")
    expect(page.get_by_text("No models yet")).to_be_visible()
    expect(page.get_by_text("No datasets yet.")).to_be_visible()
    dashboard.open("#/jobs")
    expect(page.locator(".empty")).to_have_text("No jobs match.")
    expect(page.locator("tbody tr")).to_have_count(0)
    dashboard.open("#/keys")
    expect(page.get_by_role("table", name="API keys").locator("tbody tr")).to_have_count(1)
    expect(page.get_by_text("No webhook deliveries yet")).to_be_visible()
    dashboard.watch.expect_answer(404, f"/v1/jobs/{finished_job['id']}")
    dashboard.open(f"#/jobs/{finished_job['id']}")
    expect(page.get_by_role("alert")).to_contain_text("not found")


UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea, button')]
  .filter((el) => el.offsetParent !== null)
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                  && !el.getAttribute('aria-labelledby') && !(el.tagName === 'BUTTON' && el.textContent.trim()))
  .map((el) => el.outerHTML.slice(0, 120))"""


LOW_CONTRAST = r"""() => {
  const parse = (text) => {
    const m = /rgba?\(([^)]+)\)/.exec(text);
    const p = m ? m[1].split(/[ ,\/]+/).filter(Boolean).map(Number) : [0, 0, 0, 0];
    return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1};
  };
  const luminance = ({r, g, b}) => [r, g, b].map((c) => c / 255)
    .map((c) => (c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4))
    .reduce((sum, c, i) => sum + c * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (el) => {
    for (let node = el; node; node = node.parentElement) {
      const colour = parse(getComputedStyle(node).backgroundColor);
      if (colour.a > 0) return colour;
    }
    return {r: 255, g: 255, b: 255, a: 1};
  };
  const low = [];
  for (const el of document.body.querySelectorAll('*')) {
    if (el.closest('svg, option') || el.offsetParent === null) continue;
    if (![...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
    const [light, dark] = [luminance(parse(getComputedStyle(el).color)), luminance(background(el))]
      .sort((x, y) => y - x);
    const ratio = (light + 0.05) / (dark + 0.05);
    if (ratio < 4.5 && !el.closest(':disabled')) low.push(`${el.tagName}.${el.className}: ${ratio.toFixed(2)}`);
  }
  return low;
}"""
WIDEST = """() => [...document.querySelectorAll('main *')]
  .filter((el) => el.getBoundingClientRect().right > document.documentElement.clientWidth)
  .map((el) => el.tagName + '.' + el.className).slice(-5).join(', ')"""


@pytest.mark.parametrize("width", WIDTHS)
def test_every_page_fits_is_labelled_and_is_saved_as_a_screenshot(dashboard, finished_job, width):
    page = dashboard.page
    page.set_viewport_size(dict(zip(("width", "height"), WIDTHS[width])))
    dashboard.sign_in()
    pages = {"models": "#/models", "new-job": "#/new", "jobs": "#/jobs", "job": f"#/jobs/{finished_job['id']}",
             "keys": "#/keys"}
    for name, fragment in pages.items():
        dashboard.open(fragment)
        expect(page.locator("main p", has_text="Loading...")).to_have_count(0)
        if name == "job":
            expect(page.locator("svg.chart")).to_have_count(3)
            expect(page.locator(".live-state")).to_have_text("Finished.")
        assert page.evaluate(UNLABELLED) == [], name
        assert page.evaluate(LOW_CONTRAST) == [], name  # WCAG AA for text: 4.5:1
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{name} scrolls sideways by {overflow} px at {width}: " + page.evaluate(WIDEST)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"dashboard-{name}-{WIDTHS[width][0]}.png"), full_page=name == "job")
    # Keyboard: from the skip link, Tab walks the navigation; Enter on a link opens its page, focused.
    page.locator("#skip").focus()
    focused = []
    for _ in range(5):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert focused == ["Models and datasets", "New job", "Jobs", "Keys and webhooks", "Sign out"], focused
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")
    expect(page.locator("main h1")).to_have_text("Jobs")
    expect(page.locator("main h1")).to_be_focused()


def test_the_ui_files_carry_the_content_security_policy_and_the_favicon_answers(service):
    for path in ("/ui", "/ui/app.js", "/ui/style.css", "/ui/favicon.svg"):
        response = httpx.get(f"{service.base}{path}")
        assert response.status_code == 200, path
        assert "default-src 'self'" in response.headers["content-security-policy"]
    icon = httpx.get(f"{service.base}/favicon.ico", follow_redirects=True)
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/")
