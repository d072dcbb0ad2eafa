"""The worker's tasks, called in this process (no broker involved) against a real database and storage."""

import json
import time

import numpy as np
import onnxruntime as ort
import pytest

from app.core.storage import open_storage
from app.core.tables import Artifact, Job, JobEvent, Model
from tests.helpers import make_mlp, save_onnx, save_pt2


def _run(job_id):
    from worker.tasks import run_job

    run_job(job_id)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_quantize_job_succeeds_with_faithful_smaller_model(fmt, tmp_path, worker_env, db, add_model, add_job):
    import torch

    path = (save_pt2 if fmt == "pt2" else save_onnx)(tmp_path / f"mlp.{fmt}", 64, 256, 10, batch=4)
    job_id = add_job(add_model(path, fmt))
    _run(job_id)
    with db() as session:
        job = session.get(Job, job_id)
        assert job.status == "succeeded", (job.error_code, job.error_message)
        assert job.attempts == 1 and job.progress_fraction == 1.0
        metrics = job.metrics
        artifacts = {a.kind: a for a in job.artifacts if a.format != "html"}  # the JSON report, not the HTML one
        history = [e.to_status for e in session.query(JobEvent).filter_by(job_id=job_id, kind="status")
                   .order_by(JobEvent.id)]
    assert history == ["queued", "running", "succeeded"]
    assert metrics["compression_ratio"] > 3.0
    assert metrics["fidelity"]["cosine_mean"] > 0.99 and metrics["fidelity"]["cosine_min"] > 0.98
    assert metrics["baseline"]["params"] == metrics["compressed"]["params"] == 64 * 256 + 256 + 256 * 256 + 256 + 2570
    assert metrics["baseline"]["latency_ms"]["p50"] > 0 and metrics["compressed"]["latency_ms"]["p95"] > 0
    assert metrics["environment"]["runtime"] == "onnxruntime" and metrics["environment"]["device"] == "cpu"
    assert metrics["steps"][0]["op"] == "quantize" and metrics["steps"][0]["seconds"] >= 0
    assert metrics["fidelity"]["top1_agreement"] >= 0.9
    assert metrics["evaluation"]["inputs"] == "generated"

    storage = open_storage(worker_env.resolved_storage_url())
    model_file = tmp_path / "out.onnx"
    storage.get_file(artifacts["model"].storage_key, model_file)
    assert model_file.stat().st_size == artifacts["model"].size_bytes
    report_file = tmp_path / "report.json"
    storage.get_file(artifacts["report"].storage_key, report_file)
    assert json.loads(report_file.read_text())["compression_ratio"] == metrics["compression_ratio"]
    # The delivered model runs and agrees with the original PyTorch model.
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    want = make_mlp(64, 256, 10)(torch.from_numpy(x)).detach().numpy()
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.99


COLLAPSING = [{"op": "prune", "method": "magnitude", "sparsity": 0.97}, {"op": "quantize"}]


def test_a_collapsed_model_fails_the_job_and_stays_downloadable(tmp_path, worker_env, db, add_model, add_job):
    job_id = add_job(add_model(save_pt2(tmp_path / "mlp.pt2", 64, 256, 10, batch=4), "pt2"), steps=COLLAPSING)
    _run(job_id)
    with db() as session:
        job = session.get(Job, job_id)
        kinds = {a.kind for a in job.artifacts}
        assert (job.status, job.error_code) == ("failed", "fidelity_collapse"), job.error_message
        message, metrics = job.error_message, job.metrics
    assert "below the floor 0.9" in message and "step 0 (prune" in message and "accept_degraded" in message
    assert metrics["fidelity_floor"]["passed"] is False and metrics["degraded"] is True
    assert metrics["fidelity_floor"]["worst_step"]["op"] == "prune"
    assert kinds == {"model", "report", "card"}  # kept for inspection


def test_accept_degraded_or_a_lower_floor_lets_the_job_succeed(tmp_path, worker_env, db, add_model, add_job):
    model = add_model(save_pt2(tmp_path / "mlp.pt2", 64, 256, 10, batch=4), "pt2")
    degraded = add_job(model, steps=COLLAPSING, accept_degraded=True)
    lowered = add_job(model, steps=COLLAPSING, min_fidelity=0.0)
    _run(degraded)
    _run(lowered)
    with db() as session:
        first, second = session.get(Job, degraded), session.get(Job, lowered)
        assert first.status == "succeeded" and first.metrics["degraded"] is True
        assert any("accepted: accept_degraded" in note for note in first.metrics["notes"])
        assert second.status == "succeeded" and "degraded" not in second.metrics
        assert second.metrics["fidelity_floor"] | {"cosine_mean": 0} == {
            "min_fidelity": 0.0, "cosine_mean": 0, "source": "job", "passed": True}


def test_rerun_of_a_stale_job_replaces_outputs(tmp_path, worker_env, db, add_model, add_job):
    """A re-delivered job (its first worker died) runs again: attempts 2, still one model and one report."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.core.db import session_scope, utcnow

    job_id = add_job(add_model(save_onnx(tmp_path / "m.onnx"), "onnx"))
    _run(job_id)
    with session_scope(db) as session:  # pretend it was running on a worker that died mid-way
        session.execute(update(Job).where(Job.id == job_id).values(
            status="running", worker_id="dead:1", heartbeat_at=utcnow() - timedelta(hours=1)))
    _run(job_id)
    with db() as session:
        job = session.get(Job, job_id)
        assert job.status == "succeeded" and job.attempts == 2
        assert sorted((a.kind, a.format) for a in session.query(Artifact).filter_by(job_id=job_id)) == [
            ("card", "md"), ("model", "onnx"), ("report", "html"), ("report", "json")]
    keys = open_storage(worker_env.resolved_storage_url()).list_keys(f"tenants/{job.tenant_id}/jobs")
    assert len(keys) == 4


def test_finished_or_live_job_is_not_run_twice(tmp_path, worker_env, db, add_model, add_job):
    from sqlalchemy import update

    from app.core.db import session_scope, utcnow

    job_id = add_job(add_model(save_onnx(tmp_path / "m.onnx"), "onnx"))
    with session_scope(db) as session:  # alive on another worker
        session.execute(update(Job).where(Job.id == job_id).values(status="running", worker_id="other:1",
                                                                   heartbeat_at=utcnow(), attempts=1))
    _run(job_id)
    with db() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.worker_id, job.attempts) == ("running", "other:1", 1)


def test_invalid_onnx_model_fails_job_with_reason(tmp_path, worker_env, db, add_model, add_job):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07" + b"\xff" * 100)
    job_id = add_job(add_model(bad, "onnx"))
    _run(job_id)
    with db() as session:
        job = session.get(Job, job_id)
        assert job.status == "failed"
        assert job.error_code == "invalid_model" and "ONNX" in job.error_message


def test_cuda_job_never_runs_on_cpu(tmp_path, worker_env, db, add_model, add_job):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    job_id = add_job(add_model(save_onnx(tmp_path / "m.onnx"), "onnx"), device="cuda")
    _run(job_id)
    with db() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.error_code) == ("failed", "cuda_unavailable")
        assert job.metrics is None and job.artifacts == []


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_inspection_sets_ready_with_description(fmt, tmp_path, worker_env, db, add_model):
    from worker.tasks import inspect_model

    path = (save_pt2 if fmt == "pt2" else save_onnx)(tmp_path / f"m.{fmt}", 16, 32, 4, batch=2)
    model = add_model(path, fmt)
    inspect_model(model.id)
    with db() as session:
        row = session.get(Model, model.id)
    assert row.status == "ready", row.error
    assert row.info["params"] == 16 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4
    assert row.info["inputs"][0]["shape"] == [2, 16] and row.info["inputs"][0]["dtype"] == "float32"
    assert row.info["outputs"][0]["shape"] == [2, 4]


@pytest.mark.parametrize("specs, status", [({"input": {"shape": [1, 128]}, "sr": {"value": 16000}}, "ready"),
                                           ({"audio": {"shape": [1, 128]}}, "invalid")])
def test_inspection_checks_the_uploads_input_specs_and_suggests_some(specs, status, tmp_path, worker_env, db,
                                                                     add_model):
    from tests.worker.input_models import save_stateful_model
    from worker.tasks import inspect_model

    model = add_model(save_stateful_model(tmp_path / "vad.onnx"), "onnx")
    with db() as session:
        session.get(Model, model.id).input_specs = specs
        session.commit()
    inspect_model(model.id)
    with db() as session:
        row = session.get(Model, model.id)
    assert row.status == status, row.error
    assert row.info["suggested_input_specs"]["sr"] == {"value": 16000}
    if status == "invalid":
        assert row.error == ("the upload's input_specs do not fit the model: input_specs.audio: the model has no "
                             "input 'audio'; its inputs are input, state, sr")


def test_inspection_marks_garbage_invalid(tmp_path, worker_env, db, add_model):
    from worker.tasks import inspect_model

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    model = add_model(bad, "onnx")
    inspect_model(model.id)
    with db() as session:
        row = session.get(Model, model.id)
    assert row.status == "invalid" and "ONNX" in row.error


def test_exclude_keeps_matching_layers_in_full_precision(tmp_path, worker_env, db, add_model, add_job):
    import onnx

    path = save_onnx(tmp_path / "m.onnx", 16, 64, 4)
    steps = [{"op": "quantize", "method": "dynamic", "dtype": "int8", "granularity": "per_tensor",
              "exclude": [r"^4\.weight$"]}]
    job_id = add_job(add_model(path, "onnx"), steps=steps)
    _run(job_id)
    with db() as session:
        job = session.get(Job, job_id)
        assert job.status == "succeeded", job.error_message
        model_key = next(a.storage_key for a in job.artifacts if a.kind == "model")
        details = job.metrics["steps"][0]["details"]
    assert details["granularity"] == "per_tensor" and details["excluded_nodes"] == ["node_linear_2"]
    out = tmp_path / "out.onnx"
    open_storage(worker_env.resolved_storage_url()).get_file(model_key, out)
    graph = onnx.load(str(out)).graph
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    fp32 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert any(n.startswith("0.weight") for n in int8) and any(n.startswith("2.weight") for n in int8)
    assert not any(n.startswith("4.weight") for n in int8)
    assert any(n.startswith("4.weight") and not n.endswith("_scale") for n in fp32)


def _inject(monkeypatch, fault: str) -> None:
    from app.core.config import get_settings
    from worker import resources

    monkeypatch.setenv("MODELPRESS_FAULT_INJECTION", fault)
    get_settings.cache_clear()
    resources._resources.cache_clear()


@pytest.mark.parametrize("fault, code", [("stage:raise", "internal_error"), ("child:raise", "internal_error"),
                                         ("child:segfault", "crashed"), ("publish:raise", "internal_error")])
def test_a_fault_at_any_stage_ends_the_job_with_a_code_and_no_path(tmp_path, worker_env, db, add_model, add_job,
                                                                   monkeypatch, fault, code):
    job_id = add_job(add_model(save_onnx(tmp_path / "m.onnx"), "onnx"))
    _inject(monkeypatch, fault)
    started = time.monotonic()
    _run(job_id)
    with db() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.error_code) == ("failed", code), job.error_message
        assert str(worker_env.resolved_home()) not in job.error_message and "/tmp" not in job.error_message
        assert "/worker/" not in job.error_message  # the injected fault names the code's own file, as tracebacks do
    assert time.monotonic() - started < 60
    assert list((worker_env.resolved_home() / "work").iterdir()) == []


@pytest.mark.parametrize("fault", ["stage:raise", "child:raise", "child:segfault"])
def test_a_fault_in_inspection_marks_the_model_invalid_at_once(tmp_path, worker_env, db, add_model, monkeypatch,
                                                               fault):
    from worker.tasks import inspect_model

    model = add_model(save_onnx(tmp_path / "m.onnx"), "onnx")
    _inject(monkeypatch, fault)
    inspect_model(model.id)
    with db() as session:
        row = session.get(Model, model.id)
        assert row.status == "invalid" and row.error
        assert str(worker_env.resolved_home()) not in row.error


def test_the_report_says_how_the_job_was_isolated(tmp_path, worker_env, db, add_model, add_job):
    import os

    job_id = add_job(add_model(save_onnx(tmp_path / "m.onnx"), "onnx"))
    _run(job_id)
    with db() as session:
        sandbox = session.get(Job, job_id).metrics["sandbox"]
    assert sandbox["core_dumps"] is False and sandbox["memory_bytes"] > 0 and sandbox["cpu_seconds"] > 0
    if os.geteuid() == 0:
        assert sandbox["network"] is False and sandbox["pid_namespace"] is True
        assert "MODELPRESS_HOME" in sandbox["hidden"] and str(worker_env.resolved_home()) not in str(sandbox)


def test_a_tuning_job_cancelled_midway_delivers_its_best_trial(tmp_path, worker_env, db, add_model, add_job,
                                                               db_job_tune, monkeypatch):
    """The sandbox hands each finished trial to the worker: a job stopped before tuning ends still delivers."""
    from sqlalchemy import update

    from app.core.db import session_scope
    from worker import tasks

    job_id = add_job(add_model(save_onnx(tmp_path / "m.onnx", 256, 1024, 10), "onnx"))
    db_job_tune(job_id, {"metric": "fidelity", "max_loss": 0.5, "objective": "size", "max_trials": 8})

    # The user cancels the moment the worker has recorded the first finished trial (polling the job's message
    # for it raced with the next trial's progress overwriting it on a fast machine).
    record_trial = tasks.TrialsSoFar.add

    def add_then_cancel(self, message):
        if not self.trials:
            with session_scope(db) as session:
                session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        record_trial(self, message)

    monkeypatch.setattr(tasks.TrialsSoFar, "add", add_then_cancel)
    _run(job_id)
    with db() as session:
        job = session.get(Job, job_id)
        assert job.status == "cancelled", (job.error_code, job.error_message)
        assert "best of" in job.error_message and job.metrics["tuning"]["complete"] is False
        assert 1 <= len(job.metrics["tuning"]["trials"]) < 8
        [artifact] = job.artifacts
        assert artifact.filename == "best-trial.onnx"
    model_file = tmp_path / "best.onnx"
    open_storage(worker_env.resolved_storage_url()).get_file(artifact.storage_key, model_file)
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: np.ones((4, 256), np.float32)})[0].shape == (4, 10)


def test_a_tuning_job_shows_its_best_trial_so_far_until_the_final_artifacts_replace_it(
        tmp_path, worker_env, db, add_model, add_job, db_job_tune, monkeypatch):
    """The sandbox names each better trial; the worker stores it and records it as the one provisional artifact
    (the previous one's row and file go); the job's end leaves only final artifacts."""
    from worker import tasks

    model = add_model(save_onnx(tmp_path / "m.onnx", 64, 128, 8), "onnx")
    job_id = add_job(model)
    db_job_tune(job_id, {"metric": "fidelity", "max_loss": 0.02, "objective": "size", "max_trials": 3, "search": [
        {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "fp16"}]},
        {"steps": [{"op": "quantize", "method": "dynamic", "dtype": "int8"}]},
        {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.95}]}]})
    storage = open_storage(worker_env.resolved_storage_url())
    folder = f"tenants/{model.tenant_id}/jobs/{job_id}"
    seen = []
    publish = tasks.TrialsSoFar.best_so_far

    def publish_and_look(self, message):
        publish(self, message)
        with db() as session:
            rows = [(a.filename, a.provisional, a.storage_key) for a in session.get(Job, job_id).artifacts]
        seen.append((message["index"], rows, storage.list_keys(folder)))

    monkeypatch.setattr(tasks.TrialsSoFar, "best_so_far", publish_and_look)
    _run(job_id)
    assert [index for index, _, _ in seen] == [0, 1]  # int8 beat fp16; the collapsed pruning beat nothing
    for index, rows, keys in seen:
        [(filename, provisional, key)] = rows
        assert provisional and filename == f"m-best-so-far-trial{index}.onnx" and keys == [key]
    with db() as session:
        job = session.get(Job, job_id)
        final = sorted((a.kind, a.format, a.provisional) for a in job.artifacts)
        assert job.status == "succeeded", (job.error_code, job.error_message)
    assert final == [("card", "md", False), ("model", "onnx", False), ("report", "html", False),
                     ("report", "json", False)]
    keys = storage.list_keys(folder)
    assert len(keys) == 4 and not any("best-so-far" in key for key in keys)
