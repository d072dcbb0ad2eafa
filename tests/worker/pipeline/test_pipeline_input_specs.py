"""Input specs through the worker's task, on a tiny streaming ONNX model (signal, state batched on axis 1,
scalar sample rate) that does not run on the inputs its declared shapes give."""

import numpy as np

from app.core.tables import Job
from tests.worker.input_models import STATE, STATEFUL_SPECS, save_stateful_model
from tests.worker.pipeline.test_pipeline import finished, run_job


def test_generated_inputs_that_do_not_run_fail_naming_the_inputs_and_specs_make_the_job_run(tmp_path, worker_env, db,
                                                                                           add_model, add_job):
    model = add_model(save_stateful_model(tmp_path / "vad.onnx"), "onnx")
    failing = add_job(model)
    run_job(failing)
    with db() as session:
        job = session.get(Job, failing)
    assert (job.status, job.error_code) == ("failed", "input_spec_needed")
    assert job.error_message.startswith("the model does not run on the generated inputs (input: standard normal, "
                                        "shape [4, 16] float32; state: standard normal, shape [2, 4, 8] float32; sr: ")
    assert "give input_specs for 'input', 'state', 'sr'" in job.error_message
    assert "ONNXRuntimeError" not in job.error_message and str(tmp_path) not in job.error_message

    succeeding = add_job(model, input_specs=STATEFUL_SPECS)
    run_job(succeeding)
    evaluation = finished(db, succeeding).metrics["evaluation"]
    assert evaluation["input_shapes"] == [[1, 128], [2, 1, STATE], []]
    assert "sr: the constant 16000, shape [] int64" in evaluation["generated"]


def test_an_eval_dataset_feeds_the_state_along_its_batch_axis_and_the_rate_from_the_specs(tmp_path, worker_env, db,
                                                                                          add_model, add_job,
                                                                                          add_dataset):
    model = add_model(save_stateful_model(tmp_path / "vad.onnx"), "onnx")
    rng = np.random.default_rng(0)
    eval_id = add_dataset(model, tmp_path / "eval.npz", input=rng.standard_normal((12, 128)).astype(np.float32),
                          state=rng.standard_normal((12, 2, STATE)).astype(np.float32))
    specs = {**STATEFUL_SPECS, "input": {"shape": [4, 128]}}
    job_id = add_job(model, input_specs=specs, datasets={"eval": eval_id})
    run_job(job_id)
    metrics = finished(db, job_id).metrics
    assert metrics["evaluation"]["inputs"] == "eval dataset" and metrics["evaluation"]["samples"] == 12
    assert metrics["evaluation"]["input_shapes"] == [[4, 128], [2, 4, STATE], []]
    assert metrics["fidelity"]["cosine_mean"] > 0.9


def test_specs_the_api_could_not_check_are_checked_against_the_loaded_model(tmp_path, worker_env, db, add_model,
                                                                             add_job):
    """A job submitted before inspection described the model: its specs meet the model's inputs in the worker."""
    model = add_model(save_stateful_model(tmp_path / "vad.onnx"), "onnx")
    job_id = add_job(model, input_specs={"audio": {"shape": [1, 128]}})
    run_job(job_id)
    with db() as session:
        job = session.get(Job, job_id)
    assert (job.status, job.error_code) == ("failed", "invalid_request")
    assert job.error_message == "input_specs.audio: the model has no input 'audio'; its inputs are input, state, sr"


def test_a_pt2_model_whose_export_needs_longer_signals_names_its_input_then_runs_with_a_shape(tmp_path, worker_env,
                                                                                            db, add_model, add_job):
    import torch
    import torch.nn.functional as F

    class Padded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(1, 4)

        def forward(self, signal):
            return self.linear(F.pad(signal.unsqueeze(1), (63, 63), mode="reflect").mean(dim=2))

    path = tmp_path / "padded.pt2"
    auto = torch.export.Dim.AUTO
    torch.export.save(torch.export.export(Padded().eval(), (torch.randn(2, 128),),
                                          dynamic_shapes=({0: auto, 1: auto},)), str(path))
    model = add_model(path, "pt2")
    failing = add_job(model)
    run_job(failing)
    with db() as session:
        job = session.get(Job, failing)
    assert (job.status, job.error_code) == ("failed", "input_spec_needed")
    assert "give input_specs for 'signal'" in job.error_message and "Guard" not in job.error_message
    # The export's own ranges make the proposal in the message one that runs: batch >= 2, samples >= 64.
    assert job.error_message.endswith('{"signal": {"shape": [2, 64]}}')
    succeeding = add_job(model, input_specs={"signal": {"shape": [2, 128], "range": [-1, 1]}})
    run_job(succeeding)
    assert finished(db, succeeding).metrics["evaluation"]["input_shapes"] == [[2, 128]]
