"""The job report's notes (found by bench/zoo.py: weight-only int4 on convolutional OCR models delivered a file
larger than the original, and the report said it was "smaller, not faster")."""

from app.core.tables import Job
from tests.helpers import save_conv_only_onnx


def test_a_result_no_smaller_than_the_original_says_so(tmp_path, worker_env, db, add_model, add_job):
    from worker.tasks import run_job

    model = add_model(save_conv_only_onnx(tmp_path / "convs.onnx"), "onnx")
    job_id = add_job(model, steps=[{"op": "quantize", "method": "weight_only", "dtype": "int4",
                                    "granularity": "group", "group_size": 32}])
    run_job(job_id)
    with db() as session:
        job = session.get(Job, job_id)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    metrics = job.metrics
    assert metrics["compression_ratio"] <= 1
    notes = " ".join(metrics["notes"])
    assert "not smaller than the baseline" in notes
    assert "it is smaller, not faster" not in notes
    assert "found no MatMul or Gemm weights" in notes and "embeddings" not in job.metrics["steps"][0]["details"]
    assert "measured on generated inputs" in notes  # no eval dataset: the report says how little it knows
